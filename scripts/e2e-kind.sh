#!/usr/bin/env bash
# Kanal on a kind cluster, end to end: build the image, load it into kind, install the
# CRDs and the chart, deploy the demo, run the e2e tests.
#
#   scripts/e2e-kind.sh          # up, test, down
#   scripts/e2e-kind.sh up       # cluster + image + chart + demo, and leave it running
#   scripts/e2e-kind.sh test     # python -m pytest -m e2e tests/e2e on the running cluster
#   scripts/e2e-kind.sh down     # delete the cluster
#
# Needs a Docker engine, kind, kubectl and helm (helm falls back to the one the tests
# build from its Go module: python -m tests.chart.helm). The ingress is reachable on
# http://127.0.0.1:${KANAL_E2E_HTTP_PORT:-30080} (a NodePort mapped by kind).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KANAL_E2E_CLUSTER:-kanal-e2e}
IMAGE=${KANAL_E2E_IMAGE:-kanal:e2e}
NAMESPACE=${KANAL_E2E_NAMESPACE:-kanal-system}
HTTP_PORT=${KANAL_E2E_HTTP_PORT:-30080}
CONTEXT="kind-${CLUSTER}"
HELM=${HELM:-$(command -v helm || python -m tests.chart.helm)}

say() { printf '\n== %s\n' "$*"; }

up() {
  docker info >/dev/null
  if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "kind cluster $CLUSTER (ingress on 127.0.0.1:$HTTP_PORT)"
    kind create cluster --name "$CLUSTER" --wait 180s --config - <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraPortMappings:
      - {containerPort: 30080, hostPort: ${HTTP_PORT}, listenAddress: 127.0.0.1, protocol: TCP}
KIND
  fi
  say "image $IMAGE"
  docker build -t "$IMAGE" .
  kind load docker-image "$IMAGE" --name "$CLUSTER"

  say "CRDs and chart"
  kubectl --context "$CONTEXT" apply --server-side -f crds/
  "$HELM" upgrade --install kanal charts/kanal --kube-context "$CONTEXT" \
    --namespace "$NAMESPACE" --create-namespace \
    --values tests/e2e/values-kind.yaml \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
    --wait --timeout 5m

  say "demo: shop v1 and v2, canary, blue/green and mesh Routes"
  kubectl --context "$CONTEXT" apply -f tests/e2e/manifests/demo.yaml
  kubectl --context "$CONTEXT" -n demo rollout status deploy/shop-v1 deploy/shop-v2 --timeout 180s
  kubectl --context "$CONTEXT" get routes,upstreams -n demo
  echo "try: curl -H 'Host: canary.demo.test' http://127.0.0.1:$HTTP_PORT/"
}

run_tests() {
  KANAL_E2E_CLUSTER="$CLUSTER" KANAL_E2E_NAMESPACE="$NAMESPACE" KANAL_E2E_HTTP_PORT="$HTTP_PORT" \
  KANAL_E2E_READY=1 python -m pytest -m e2e tests/e2e -v
}

down() {
  kind delete cluster --name "$CLUSTER"
}

case "${1:-all}" in
  up) up ;;
  test) run_tests ;;
  down) down ;;
  all) up; trap down EXIT; run_tests ;;
  *) echo "usage: $0 [up|test|down|all]" >&2; exit 2 ;;
esac
