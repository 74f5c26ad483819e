// What both CPU attention ops need to know about their paged inputs, checked once per call.
//
// Layout (fixed by the engine): k_cache / v_cache are per-layer views
// [num_blocks, block_size, Hkv, D] of kv_cache[num_blocks, layers, 2, block_size, Hkv, D]:
// strided along dim 0, contiguous inside a block. Query head h attends to KV head h / G.
// Queries are [rows, Hq, D] with each row's heads contiguous (rows may be a strided view, e.g.
// split off a fused q/k projection).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace splitserve {

struct PagedLayout {
  int64_t Hq, Hkv, G, D, block_size, num_blocks;
  int64_t block_stride;  // elements between consecutive blocks of one layer's K (or V)
  int64_t token_stride;  // elements between consecutive tokens of a block (Hkv * D)
  int64_t max_blocks;    // columns of the block table
  int64_t q_stride;      // elements between consecutive query rows
  float scale;
};

// Checks shared by the ops (device, shapes, strides, dtypes, the int32 block table); raises
// c10::Error with a message naming the argument. `op` prefixes the messages.
inline PagedLayout check_paged_inputs(const char* op, const at::Tensor& query,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, double scale) {
  TORCH_CHECK(query.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  block_tables.device().is_cpu(),
              op, ": CPU tensors only");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2), op,
              ": query must be [rows, Hq, D] with each row's heads contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.stride(0) == v_cache.stride(0),
              op, ": k_cache and v_cache must be [num_blocks, block_size, Hkv, D], equal strides");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3) &&
                  v_cache.stride(1) == k_cache.stride(1) && v_cache.stride(2) == v_cache.size(3) &&
                  v_cache.stride(3) == 1,
              op, ": each KV block must be contiguous [block_size, Hkv, D]");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              op, ": query and caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous(),
              op, ": block_tables must be contiguous int32 [B, max_blocks]");
  const int64_t Hq = query.size(1), Hkv = k_cache.size(2), D = query.size(2);
  TORCH_CHECK(k_cache.size(3) == D, op, ": head_dim of query and cache differ");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": query heads must be a multiple of KV heads");
  return {Hq,
          Hkv,
          Hq / Hkv,
          D,
          k_cache.size(1),
          k_cache.size(0),
          k_cache.stride(0),
          Hkv * D,
          block_tables.size(1),
          query.stride(0),
          static_cast<float>(scale)};
}

// The first `num_used` entries of one block-table row must name blocks of the pool (an id out
// of range would make the kernels read outside it).
inline void check_block_ids(const char* op, const PagedLayout& g, const int32_t* row,
                            int64_t num_used, int64_t seq) {
  for (int64_t j = 0; j < num_used; ++j)
    TORCH_CHECK(row[j] >= 0 && row[j] < g.num_blocks, op, ": block_tables[", seq, "][", j,
                "] = ", row[j], " is not a block of the pool (", g.num_blocks, " blocks)");
}

}  // namespace splitserve
