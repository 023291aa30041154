"""The official OpenAI and Anthropic Python SDKs against tollgate (run by tests/sdk.rs).

Every check makes a call through an unmodified SDK, asserts what the SDK parsed, and then
the ledger row the call left (or that it left none), read through the admin API. Exits 0
when every check passed; prints one line per check.

Environment (set by tests/sdk.rs): TG_BASE_URL, TG_ADMIN_URL, TG_ADMIN_TOKEN, TG_KEY and
TG_KEY_ID (no limits), and for each SDK (OPENAI, ANTHROPIC) a key with requests:day=1
(TG_DAY_<SDK>_KEY, TG_DAY_<SDK>_KEY_ID) and one with requests:total=1 (TG_TOTAL_…).
"""

import json
import os
import sys
import time
import urllib.request
import uuid

import anthropic
import openai

ENV = os.environ
BASE = ENV["TG_BASE_URL"]
KEY, KEY_ID = ENV["TG_KEY"], ENV["TG_KEY_ID"]


def admin(path):
    req = urllib.request.Request(
        ENV["TG_ADMIN_URL"] + path,
        headers={"Authorization": "Bearer " + ENV["TG_ADMIN_TOKEN"]},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def rows(key_id):
    return admin(f"/admin/transactions?key={key_id}&limit=500")["transactions"]


def settled_row(key_id, trace_id):
    """The ledger row of trace_id once it is final (settling follows the response)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        for row in rows(key_id):
            if row["trace_id"] == trace_id and row["status"] != "reserved":
                return row
        time.sleep(0.02)
    raise AssertionError(f"no final ledger row for {trace_id}: {rows(key_id)}")


def counter(series):
    """A counter of tollgate's /metrics."""
    with urllib.request.urlopen(ENV["TG_ADMIN_URL"] + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return int(float(line.split()[-1]))
    raise AssertionError(f"no {series}")


EXCEEDED = 'tollgate_quota_rejections_total{reason="exceeded"}'
DUPLICATES = "tollgate_idempotent_hits_total"


def trace():
    """An Idempotency-Key, and the trace id tollgate names the request by (SPEC §4.7)."""
    k = "sdk-" + uuid.uuid4().hex
    return {"Idempotency-Key": k}, f"{KEY_ID}:{k}"


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY)
MESSAGES = [{"role": "user", "content": "Say hello to the conformance suite."}]


def chat_non_stream():
    h, t = trace()
    r = oa.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, extra_headers=h
    )
    expect(r.choices[0].message.content, "an answer")
    row = settled_row(KEY_ID, t)
    expect(row["status"] == "settled" and row["usage_source"] == "upstream", row)
    expect(row["input_tokens"] == r.usage.prompt_tokens, (row, r.usage))
    expect(row["output_tokens"] == r.usage.completion_tokens, (row, r.usage))
    expect(row["stream"] is False and row["http_status"] == 200, row)


def chat_stream_without_usage():
    h, t = trace()
    chunks = list(
        oa.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, stream=True, extra_headers=h
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(text, "streamed text")
    # tollgate asked the upstream for usage; the client, who did not, never sees it.
    expect(all(c.usage is None for c in chunks), "no usage chunk reaches the client")
    row = settled_row(KEY_ID, t)
    expect(row["usage_source"] == "upstream" and row["output_tokens"] > 0, row)
    expect(row["stream"] is True, row)


def chat_stream_with_usage():
    h, t = trace()
    chunks = list(
        oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=h,
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    expect(len(usage) == 1, f"one usage chunk, got {len(usage)}")
    row = settled_row(KEY_ID, t)
    expect(row["input_tokens"] == usage[0].prompt_tokens, (row, usage))
    expect(row["output_tokens"] == usage[0].completion_tokens, (row, usage))


def responses_stream():
    h, t = trace()
    done = None
    text = ""
    for ev in oa.responses.create(
        model="gpt-4o-mini", input="Say hello.", max_output_tokens=60, stream=True, extra_headers=h
    ):
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            done = ev.response
    expect(text and done is not None, "text and a completed event")
    row = settled_row(KEY_ID, t)
    expect(row["input_tokens"] == done.usage.input_tokens, (row, done.usage))
    expect(row["output_tokens"] == done.usage.output_tokens, (row, done.usage))


def embeddings():
    h, t = trace()
    r = oa.embeddings.create(
        model="text-embedding-3-small", input="tollgate meters embeddings too", extra_headers=h
    )
    expect(len(r.data) == 1 and len(r.data[0].embedding) > 0, "one vector")
    row = settled_row(KEY_ID, t)
    expect(row["input_tokens"] == r.usage.prompt_tokens and row["output_tokens"] == 0, row)


def anthropic_non_stream():
    h, t = trace()
    m = an.messages.create(
        model="claude-sonnet-4-5", max_tokens=60, messages=MESSAGES, extra_headers=h
    )
    expect(m.content[0].text, "an answer")
    row = settled_row(KEY_ID, t)
    expect(row["upstream"] == "anthropic" and row["usage_source"] == "upstream", row)
    expect(row["input_tokens"] == m.usage.input_tokens, (row, m.usage))
    expect(row["output_tokens"] == m.usage.output_tokens, (row, m.usage))


def anthropic_stream_helper():
    h, t = trace()
    with an.messages.stream(
        model="claude-sonnet-4-5", max_tokens=60, messages=MESSAGES, extra_headers=h
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    expect(text and text == final.content[0].text, "the helper assembled the text")
    row = settled_row(KEY_ID, t)
    expect(row["stream"] is True and row["output_tokens"] == final.usage.output_tokens, row)
    expect(row["input_tokens"] == final.usage.input_tokens, (row, final.usage))


def models_and_count_tokens():
    before = len(rows(KEY_ID))
    ids = [m.id for m in oa.models.list()]
    expect("gpt-4o-mini" in ids, ids)
    expect(oa.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini", "one model")
    claude = [m.id for m in an.models.list(limit=2)]  # the SDK follows the pages
    expect(len(claude) > 2 and all(i.startswith("claude-") for i in claude), claude)
    n = an.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)
    expect(n.input_tokens > 5, n)
    time.sleep(0.2)
    expect(len(rows(KEY_ID)) == before, "passthrough calls leave no ledger row")


def rate_limited():
    # requests:day=1 and requests:total=1: the second call is refused. The limit cannot
    # clear within a minute, so tollgate sends `x-should-retry: false` and the SDK raises
    # at once (with its default retries on) instead of sleeping out a Retry-After of hours.
    # No refusal leaves a ledger row.
    for name, make in (
        (
            "openai",
            lambda k: openai.OpenAI(base_url=BASE + "/v1", api_key=k).chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20
            ),
        ),
        (
            "anthropic",
            lambda k: anthropic.Anthropic(base_url=BASE, api_key=k).messages.create(
                model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES
            ),
        ),
    ):
        for window in ("DAY", "TOTAL"):
            sdk = name.upper()
            key, key_id = ENV[f"TG_{window}_{sdk}_KEY"], ENV[f"TG_{window}_{sdk}_KEY_ID"]
            make(key)
            before = counter(EXCEEDED)
            try:
                make(key)
                raise AssertionError(f"{name} {window}: the second request was admitted")
            except (openai.RateLimitError, anthropic.RateLimitError) as e:
                expect(e.status_code == 429, e)
                retry_after = e.response.headers.get("retry-after")
                if window == "DAY":
                    expect(retry_after and int(retry_after) > 60, f"retry-after: {retry_after}")
                else:
                    expect(retry_after is None, "a total allowance never frees")
                expect(e.response.headers.get("x-should-retry") == "false", e.response.headers)
                body = e.response.json()
                expect(body["error"]["code"] == "quota_exceeded", body)
            attempts = counter(EXCEEDED) - before
            expect(attempts == 1, f"{name} {window}: {attempts} attempts")
            time.sleep(0.1)
            ledger = rows(key_id)
            expect(len(ledger) == 1, f"{name} {window}: one row, the admitted request: {ledger}")


def duplicate_with_default_retries():
    # The SDKs retry a 409 (twice, by default) unless told not to: a request repeating a
    # settled Idempotency-Key is refused with `x-should-retry: false`, so the SDK raises at
    # once, and the trace keeps its one ledger row.
    for name, call, conflict in (
        (
            "openai",
            lambda h: oa.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, extra_headers=h
            ),
            openai.ConflictError,
        ),
        (
            "anthropic",
            lambda h: an.messages.create(
                model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES, extra_headers=h
            ),
            anthropic.ConflictError,
        ),
    ):
        h, t = trace()
        call(h)
        settled_row(KEY_ID, t)
        before = counter(DUPLICATES)
        try:
            call(h)
            raise AssertionError(f"{name}: a repeated Idempotency-Key was admitted")
        except conflict as e:
            expect(e.status_code == 409, e)
            expect(e.response.headers.get("x-tollgate-trace-id") == t, e.response.headers)
            expect(e.response.headers.get("x-should-retry") == "false", e.response.headers)
        attempts = counter(DUPLICATES) - before
        expect(attempts == 1, f"{name}: one request, no retry of a duplicate, got {attempts}")
        same = [r for r in rows(KEY_ID) if r["trace_id"] == t]
        expect(len(same) == 1 and same[0]["status"] == "settled", same)


def unauthorized():
    try:
        openai.OpenAI(base_url=BASE + "/v1", api_key="tg_not_a_key").models.list()
        raise AssertionError("admitted")
    except openai.AuthenticationError as e:
        expect(e.status_code == 401 and e.code == "invalid_api_key", e)
    try:
        anthropic.Anthropic(base_url=BASE, api_key="tg_not_a_key").messages.create(
            model="claude-sonnet-4-5", max_tokens=20, messages=MESSAGES
        )
        raise AssertionError("admitted")
    except anthropic.AuthenticationError as e:
        expect(e.status_code == 401, e)
        expect(e.response.json()["error"]["type"] == "authentication_error", e.response.text)


CHECKS = [
    chat_non_stream,
    chat_stream_without_usage,
    chat_stream_with_usage,
    responses_stream,
    embeddings,
    anthropic_non_stream,
    anthropic_stream_helper,
    models_and_count_tokens,
    rate_limited,
    duplicate_with_default_retries,
    unauthorized,
]

if __name__ == "__main__":
    print(f"python openai {openai.__version__}, anthropic {anthropic.__version__}")
    failed = 0
    for check in CHECKS:
        try:
            check()
            print(f"ok   {check.__name__}")
        except Exception as e:  # report every check, then fail
            failed += 1
            print(f"FAIL {check.__name__}: {type(e).__name__}: {e}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
