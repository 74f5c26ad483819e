-- Argo CD health of a splitserve InferenceService (serving.splitserve.io/v1alpha1), read from
-- the conditions the operator writes (operator/status.py), never from the pods themselves:
--   Degraded=True  -> Degraded (InvalidSpec, ApplyFailed, RolloutStuck, PodsFailing)
--   Ready=True     -> Healthy  (every pool rolled out to the desired generation and ready)
--   otherwise      -> Progressing (RollingOut, ReplicasNotReady, or no status yet)
-- Install: argocd-cm key resource.customizations.health.serving.splitserve.io_InferenceService
-- (docs/observability.md).
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end

-- Conditions written for an older spec say nothing about the one Argo CD just synced.
local generation = obj.metadata.generation or 0
if (obj.status.observedGeneration or 0) < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local found = {}
for _, c in ipairs(obj.status.conditions) do
  if c.type ~= nil then
    found[c.type] = c
  end
end
local ready, progressing, degraded = found["Ready"], found["Progressing"], found["Degraded"]

-- Degraded first: a stuck rollout or crash-looping pods also leave Progressing=True, and
-- Argo CD should stop waiting and say why (the message names the pod and its last words).
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
-- Not ready and not failing: a rollout is under way (the previous generation keeps serving),
-- or pods are starting (model loading can take minutes).
if progressing ~= nil and progressing.status == "True" and progressing.message ~= nil then
  hs.message = progressing.message
elseif ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = "Rolling out"
end
return hs
