#!/usr/bin/env bash
# Smoke tests of a deployed API through its ingress: healthy, serving its OpenAPI schema with the
# v1 routes, refusing a v1 call without a token (401), issuing a token to the smoke client and
# answering a list in the one envelope with it, and refusing an unsigned PSP webhook with the one
# error shape (400 naming Stripe-Signature). Extra curl arguments (e.g. -H "X-Roomly-Canary:
# always" to reach the canary) follow the base URL. The smoke client's credentials come from the
# environment (a service client made with `python -m devstack.users create-client`):
#   SMOKE_CLIENT_ID=... SMOKE_CLIENT_SECRET=... .github/scripts/smoke.sh https://billing.staging.roomly.io
set -euo pipefail
base="${1:?base URL}"
shift
curl_args=(--silent --show-error --max-time 15 --retry 5 --retry-delay 3 --retry-all-errors "$@")

echo "healthz"
test "$(curl "${curl_args[@]}" "$base/healthz" | jq -r .status)" = ok

echo "openapi lists the v1 routes"
curl "${curl_args[@]}" --fail "$base/openapi.json" | jq -e '.paths | has("/v1/usage") and has("/v1/billing-runs")' >/dev/null

echo "a v1 route refuses a caller without a token"
test "$(curl "${curl_args[@]}" -o /dev/null -w '%{http_code}' "$base/v1/plans?limit=1")" = 401

echo "the smoke client gets a token"
token="$(curl "${curl_args[@]}" --fail -X POST "$base/v1/auth/token" -d grant_type=client_credentials \
  --data-urlencode "client_id=${SMOKE_CLIENT_ID:?SMOKE_CLIENT_ID}" \
  --data-urlencode "client_secret=${SMOKE_CLIENT_SECRET:?SMOKE_CLIENT_SECRET}" | jq -r .access_token)"
test -n "$token" && test "$token" != null

echo "lists answer the envelope"
curl "${curl_args[@]}" --fail -H "Authorization: Bearer $token" "$base/v1/plans?limit=1" \
  | jq -e 'has("data") and has("has_more")' >/dev/null

echo "an unsigned webhook is refused, naming the header"
status="$(curl "${curl_args[@]}" -o /tmp/smoke-webhook.json -w '%{http_code}' -X POST \
  -H 'Content-Type: application/json' --data '{"id": "evt_smoke", "type": "ping"}' "$base/v1/webhooks/stripe")"
test "$status" = 400
jq -e '.errors[0].field == "Stripe-Signature"' /tmp/smoke-webhook.json >/dev/null

echo "smoke tests passed: $base"
