#!/usr/bin/env bash
# Server-side dry run of the quick start's manifests (examples/) and the kind e2e's
# gateway (e2e/kind/gateway.yaml) against a real kube-apiserver: the API server's schema, the
# MtprotoGateway CRD's rules and admission check them without creating
# anything. The local test run points it at the test bed (e2e/k8s); it works
# with any KUBECONFIG.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
NS=kind-manifests-check

kubectl apply --server-side -f crds/mtprotogateways.mtproto-edge.io.yaml >/dev/null
kubectl wait --for condition=established --timeout 60s crd/mtprotogateways.mtproto-edge.io >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
trap 'kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true' EXIT
for f in examples/redis.yaml examples/session.yaml examples/gateway.yaml e2e/kind/gateway.yaml; do
    kubectl -n "$NS" apply --dry-run=server -f "$f"
done
