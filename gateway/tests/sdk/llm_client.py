"""Drives Tollgate's LLM proxy with the official OpenAI and Anthropic Python SDKs, as an agent
would: the SDK's base URL is the gateway's /llm/<upstream>, its API key the agent's own
credential, the run the Tollgate-Run-Id header. Reads one JSON call description from argv[1],
prints one JSON outcome: the text received, the usage the SDK saw, or the error it raised."""
import json
import sys

spec = json.loads(sys.argv[1])
out = {"ok": False, "text": "", "chunks": 0}
headers = {"Tollgate-Run-Id": spec["run"]} if spec.get("run") else {}
prompt = spec.get("prompt", "Say something about gates.")
try:
    if spec["sdk"] == "openai":
        import openai

        client = openai.OpenAI(base_url=spec["base_url"], api_key=spec["key"],
                               default_headers=headers, max_retries=0, timeout=60)
        kind = spec.get("endpoint", "chat")
        if kind == "embeddings":
            r = client.embeddings.create(model=spec["model"], input=prompt)
            out["usage"] = r.usage.model_dump()
        elif kind == "models":
            out["models"] = [m.id for m in client.models.list()]
        elif kind == "responses":
            r = client.responses.create(model=spec["model"], input=prompt,
                                        max_output_tokens=spec.get("max_tokens"))
            out["text"] = r.output_text
            out["usage"] = r.usage.model_dump()
        elif spec.get("stream"):
            args = {"max_completion_tokens": spec["max_tokens"]} if spec.get("max_tokens") else {}
            stream = client.chat.completions.create(
                model=spec["model"], messages=[{"role": "user", "content": prompt}],
                stream=True, **args)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        out["chunks"] += 1  # chunks that carried output
                    out["text"] += choice.delta.content or ""
                    if choice.finish_reason:
                        out["finish"] = choice.finish_reason
                if chunk.usage:
                    out["usage"] = chunk.usage.model_dump()
        else:
            args = {"max_tokens": spec["max_tokens"]} if spec.get("max_tokens") else {}
            r = client.chat.completions.create(
                model=spec["model"], messages=[{"role": "user", "content": prompt}], **args)
            out["text"] = r.choices[0].message.content or ""
            out["finish"] = r.choices[0].finish_reason
            out["usage"] = r.usage.model_dump() if r.usage else None
    else:
        import anthropic

        client = anthropic.Anthropic(base_url=spec["base_url"], api_key=spec["key"],
                                     default_headers=headers, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": prompt}]
        if spec.get("endpoint") == "count_tokens":
            out["input_tokens"] = client.messages.count_tokens(
                model=spec["model"], messages=messages).input_tokens
        elif spec.get("stream"):
            with client.messages.stream(model=spec["model"], max_tokens=spec["max_tokens"],
                                        messages=messages) as stream:
                for text in stream.text_stream:
                    out["chunks"] += 1
                    out["text"] += text
                final = stream.get_final_message()
                out["finish"] = final.stop_reason
                out["usage"] = final.usage.model_dump()
        else:
            r = client.messages.create(model=spec["model"], max_tokens=spec["max_tokens"],
                                       messages=messages)
            out["text"] = "".join(b.text for b in r.content if b.type == "text")
            out["finish"] = r.stop_reason
            out["usage"] = r.usage.model_dump()
    out["ok"] = True
except Exception as e:  # the SDK's own exception: what an agent framework would see
    out["error"] = {"class": type(e).__name__, "message": str(e),
                    "status": getattr(e, "status_code", None),
                    "body": getattr(e, "body", None)}
print(json.dumps(out))
