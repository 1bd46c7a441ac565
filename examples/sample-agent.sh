#!/usr/bin/env bash
# A scripted sample agent against the gateway in standalone mode. Start the gateway first:
#
#   cargo run -p tollgate-gateway -- standalone
#
# then run this script. It makes the calls a support agent would, prints each decision, and ends
# with the replay of its run from the audit store.
set -euo pipefail
url=${TOLLGATE_URL:-http://127.0.0.1:8480}
key=${TOLLGATE_KEY:-tg-demo-support-key}
run=${RUN_ID:-demo-$(date +%s)}

# The first `cargo run` builds the gateway; wait for it (up to 15 minutes on a fresh machine).
for _ in $(seq 1 450); do
  curl -sf "$url/healthz" >/dev/null 2>&1 && break
  sleep 2
done
curl -sf "$url/healthz" >/dev/null || { echo "no gateway at $url; start it first (see the README)" >&2; exit 1; }

tollgate() { # kubectl tollgate, as built here unless installed
  if command -v kubectl-tollgate >/dev/null; then kubectl-tollgate "$@"
  else cargo run -q -p kubectl-tollgate -- "$@"; fi
}

call() { # endpoint json
  curl -sS -X POST "$url/$1" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$2"
  echo
}

echo "== 1. allowed: read a customer record"
call v1/decide '{"runId":"'"$run"'","tool":"read_customer_record","arguments":{"customer_id":"C000042"}}'
echo "== the orchestrator reports the result of step 1 (the step the decision answered); the gateway returns only the resultFields"
call v1/report '{"runId":"'"$run"'","step":1,"tool":"read_customer_record","result":{"customer_id":"C000042","order_history":[],"contact_info":"ada@example.com","ssn":"123-45-6789"},"usage":{"tokens":1200,"cost":"0.02"}}'
echo "== 2. blocked: delete a customer record"
call v1/decide '{"runId":"'"$run"'","tool":"delete_customer_record","arguments":{"customer_id":"C000042"}}'
echo "== 3. constraint breach: an order id that is not O-…"
call v1/decide '{"runId":"'"$run"'","tool":"update_order_status","arguments":{"status":"refunded","order_ids":["O-1","X-2"]}}'
echo "== 4. irreversible: e-mailing a customer waits for a support lead. The agent asks without"
echo "==    waiting (wait:false) and gets 202 with the ApprovalRequest people decide"
refund='{"customer_id":"C000042","subject":"Your refund","body":"Done."}'
asked=$(call v1/decide '{"runId":"'"$run"'","tool":"send_customer_email","arguments":'"$refund"',"wait":false}')
echo "$asked"
ticket() { sed -n 's/.*"approvalRequest":{[^}]*"name":"\([^"]*\)".*/\1/p'; }
name=$(ticket <<<"$asked")
echo "== 4a. dana, a support lead, sees it waiting and approves it with her approver key"
TOLLGATE_APPROVER_KEY=tg-demo-dana-key tollgate approvals --gateway "$url"
TOLLGATE_APPROVER_KEY=tg-demo-dana-key tollgate approve "default/$name" --gateway "$url" -m "refund confirmed"
echo "== 4b. the agent redeems the approval for exactly that call: allowed (once; other arguments are another call)"
call v1/decide '{"runId":"'"$run"'","tool":"send_customer_email","arguments":'"$refund"',"approval":"'"$name"'"}'
echo "== 4c. another e-mail; lee, a support lead too, denies it, and the agent's redemption is denied"
upsell='{"customer_id":"C000042","subject":"A special offer","body":"Buy more."}'
name=$(call v1/decide '{"runId":"'"$run"'","tool":"send_customer_email","arguments":'"$upsell"',"wait":false}' | ticket)
TOLLGATE_APPROVER_KEY=tg-demo-lee-key tollgate deny "default/$name" --gateway "$url" -m "not a support message"
call v1/decide '{"runId":"'"$run"'","tool":"send_customer_email","arguments":'"$upsell"',"approval":"'"$name"'"}'
echo "== 5. budget: another read reports 60000 tokens, over maxTokensPerRun 50000, and the run is halted"
read=$(call v1/decide '{"runId":"'"$run"'","tool":"read_customer_record","arguments":{"customer_id":"C000043"}}')
echo "$read"
step=$(sed -n 's/.*"step":\([0-9]*\).*/\1/p' <<<"$read")
call v1/report '{"runId":"'"$run"'","step":'"$step"',"tool":"read_customer_record","usage":{"tokens":60000,"cost":"0.90"}}'
call v1/decide '{"runId":"'"$run"'","tool":"read_customer_record","arguments":{"customer_id":"C000042"}}'
echo "== 6. a result reported for the blocked step 2 is refused (and audited): only calls Tollgate let through have results"
call v1/report '{"runId":"'"$run"'","step":2,"tool":"delete_customer_record","result":{"deleted":true}}'
echo "== 7. a request that names another agent is refused (and audited): only the key says who is calling"
call v1/decide '{"runId":"'"$run"'","tool":"read_customer_record","agent":"default/deploy-agent","arguments":{"customer_id":"C000042"}}'

# The model calls of a second sample agent, summarizer-agent, through the LLM proxy. Its provider
# is the FAKE one Tollgate ships for examples (it makes words up); started here if not running.
llm=${TOLLGATE_FAKE_LLM:-127.0.0.1:8490}
if ! curl -s "http://$llm/v1/models" >/dev/null 2>&1; then
  cargo run -q -p tollgate-gateway --example fake-llm -- "$llm" 2>/dev/null &
  fake=$!
  trap 'kill $fake 2>/dev/null' EXIT
  for _ in $(seq 1 300); do curl -s "http://$llm/v1/models" >/dev/null 2>&1 && break; sleep 1; done
fi
model() { # run json [curl options]
  local run=$1 body=$2; shift 2
  curl -sS -X POST "$url/llm/models/chat/completions" "$@" -H "Authorization: Bearer tg-demo-summarizer-key" \
    -H "Tollgate-Run-Id: $run" -H 'Content-Type: application/json' -d "$body"
  echo
}
mrun=$run-summary
echo "== 8. a model call through the LLM proxy: the agent asks for 5000 output tokens; the gateway"
echo "==    lowers the cap to what the run can pay for (maxOutputTokens 1024, maxTokensPerRun 400),"
echo "==    adds the provider key the agent never holds, and charges the usage the provider reports"
model "$mrun" '{"model":"gpt-4o-mini","max_tokens":5000,"messages":[{"role":"user","content":"Summarize ticket T000042."}]}'
echo "== 9. a model the policy does not list is refused before anything leaves"
model "$mrun" '{"model":"gpt-4o","messages":[{"role":"user","content":"Summarize ticket T000042."}]}'
echo "== 10. a streamed answer from a provider that ignores the cap is ended at the run's ceiling"
echo "==     (the last events: the error event Tollgate sent instead of the next delta)"
model "$mrun" '{"model":"greedy","stream":true,"messages":[{"role":"user","content":"Summarize every ticket."}]}' -N | tail -n 4
echo "== 11. the run is halted: its next model call is refused, though the agent never reported a token"
model "$mrun" '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"One more."}]}'
echo
echo "== replay of the model run $mrun: each call with its tokens, cap and cost, the cut, the halt"
tollgate audit replay --run "$mrun"
echo
echo "== replay of run $run from the audit store"
tollgate audit replay --run "$run"
echo
echo "== the support agent's track record and unused rights (graduation and drift)"
tollgate audit drift --policy config/samples/support-agent.yaml
echo
echo "== every agent now, from the audit trail (kubectl tollgate top; without --once it refreshes in place)"
tollgate top --once --policies config/samples
