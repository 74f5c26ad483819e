#!/usr/bin/env bash
# Placeholder: the operator work installs helm/kubectl here.
exit 0
