// The official OpenAI and Anthropic Node.js SDKs against tollgate (run by tests/sdk.rs).
//
// Every check makes a call through an unmodified SDK, asserts what the SDK parsed, and then
// the ledger row the call left (or that it left none), read through the admin API. Exits 0
// when every check passed; prints one line per check. The environment is the one
// tests/sdk/python/conformance.py documents.
//
// openai is pinned to the 6.x line: 7.x requires Node.js 22, and Debian's machines here
// have Node.js 20.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";

const ENV = process.env;
const BASE = ENV.TG_BASE_URL;
const KEY = ENV.TG_KEY;
const KEY_ID = ENV.TG_KEY_ID;

async function admin(path) {
  const r = await fetch(ENV.TG_ADMIN_URL + path, {
    headers: { Authorization: `Bearer ${ENV.TG_ADMIN_TOKEN}` },
  });
  return r.json();
}

async function rows(keyId) {
  return (await admin(`/admin/transactions?key=${keyId}&limit=500`)).transactions;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The ledger row of traceId once it is final (settling follows the response).
async function settledRow(keyId, traceId) {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const row = (await rows(keyId)).find((r) => r.trace_id === traceId && r.status !== "reserved");
    if (row) return row;
    await sleep(20);
  }
  throw new Error(`no final ledger row for ${traceId}`);
}

// A counter of tollgate's /metrics.
async function counter(series) {
  const text = await (await fetch(ENV.TG_ADMIN_URL + "/metrics")).text();
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  if (!line) throw new Error(`no ${series}`);
  return Number(line.split(" ").pop());
}

const EXCEEDED = 'tollgate_quota_rejections_total{reason="exceeded"}';
const DUPLICATES = "tollgate_idempotent_hits_total";

// An Idempotency-Key, and the trace id tollgate names the request by (SPEC §4.7).
function trace() {
  const k = `sdk-${randomUUID()}`;
  return [{ headers: { "Idempotency-Key": k } }, `${KEY_ID}:${k}`];
}

function expect(cond, what) {
  if (!cond) throw new Error(typeof what === "string" ? what : JSON.stringify(what));
}

const oa = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: KEY });
const an = new Anthropic({ baseURL: BASE, apiKey: KEY });
const MESSAGES = [{ role: "user", content: "Say hello to the conformance suite." }];

async function chatNonStream() {
  const [opts, t] = trace();
  const r = await oa.chat.completions.create(
    { model: "gpt-4o-mini", messages: MESSAGES, max_tokens: 50 },
    opts,
  );
  expect(r.choices[0].message.content, "an answer");
  const row = await settledRow(KEY_ID, t);
  expect(row.status === "settled" && row.usage_source === "upstream", row);
  expect(row.input_tokens === r.usage.prompt_tokens, [row, r.usage]);
  expect(row.output_tokens === r.usage.completion_tokens, [row, r.usage]);
  expect(row.stream === false && row.http_status === 200, row);
}

async function chatStreamWithoutUsage() {
  const [opts, t] = trace();
  const stream = await oa.chat.completions.create(
    { model: "gpt-4o-mini", messages: MESSAGES, max_tokens: 50, stream: true },
    opts,
  );
  let text = "";
  let usage = 0;
  for await (const c of stream) {
    if (c.choices.length) text += c.choices[0].delta.content ?? "";
    if (c.usage) usage += 1;
  }
  expect(text, "streamed text");
  expect(usage === 0, "no usage chunk reaches the client");
  const row = await settledRow(KEY_ID, t);
  expect(row.usage_source === "upstream" && row.output_tokens > 0 && row.stream === true, row);
}

async function chatStreamWithUsage() {
  const [opts, t] = trace();
  const stream = await oa.chat.completions.create(
    {
      model: "gpt-4o-mini",
      messages: MESSAGES,
      max_tokens: 50,
      stream: true,
      stream_options: { include_usage: true },
    },
    opts,
  );
  const usage = [];
  for await (const c of stream) if (c.usage) usage.push(c.usage);
  expect(usage.length === 1, `one usage chunk, got ${usage.length}`);
  const row = await settledRow(KEY_ID, t);
  expect(row.input_tokens === usage[0].prompt_tokens, [row, usage]);
  expect(row.output_tokens === usage[0].completion_tokens, [row, usage]);
}

async function responsesStream() {
  const [opts, t] = trace();
  const stream = await oa.responses.create(
    { model: "gpt-4o-mini", input: "Say hello.", max_output_tokens: 60, stream: true },
    opts,
  );
  let text = "";
  let done = null;
  for await (const ev of stream) {
    if (ev.type === "response.output_text.delta") text += ev.delta;
    if (ev.type === "response.completed") done = ev.response;
  }
  expect(text && done, "text and a completed event");
  const row = await settledRow(KEY_ID, t);
  expect(row.input_tokens === done.usage.input_tokens, [row, done.usage]);
  expect(row.output_tokens === done.usage.output_tokens, [row, done.usage]);
}

async function embeddings() {
  const [opts, t] = trace();
  const r = await oa.embeddings.create(
    { model: "text-embedding-3-small", input: "tollgate meters embeddings too" },
    opts,
  );
  expect(r.data.length === 1 && r.data[0].embedding.length > 0, "one vector");
  const row = await settledRow(KEY_ID, t);
  expect(row.input_tokens === r.usage.prompt_tokens && row.output_tokens === 0, row);
}

async function anthropicNonStream() {
  const [opts, t] = trace();
  const m = await an.messages.create(
    { model: "claude-sonnet-4-5", max_tokens: 60, messages: MESSAGES },
    opts,
  );
  expect(m.content[0].text, "an answer");
  const row = await settledRow(KEY_ID, t);
  expect(row.upstream === "anthropic" && row.usage_source === "upstream", row);
  expect(row.input_tokens === m.usage.input_tokens, [row, m.usage]);
  expect(row.output_tokens === m.usage.output_tokens, [row, m.usage]);
}

async function anthropicStreamHelper() {
  const [opts, t] = trace();
  const stream = an.messages.stream(
    { model: "claude-sonnet-4-5", max_tokens: 60, messages: MESSAGES },
    opts,
  );
  let text = "";
  stream.on("text", (delta) => {
    text += delta;
  });
  const final = await stream.finalMessage();
  expect(text && text === final.content[0].text, "the helper assembled the text");
  const row = await settledRow(KEY_ID, t);
  expect(row.stream === true && row.output_tokens === final.usage.output_tokens, row);
  expect(row.input_tokens === final.usage.input_tokens, [row, final.usage]);
}

async function modelsAndCountTokens() {
  const before = (await rows(KEY_ID)).length;
  const ids = [];
  for await (const m of oa.models.list()) ids.push(m.id);
  expect(ids.includes("gpt-4o-mini"), ids);
  expect((await oa.models.retrieve("gpt-4o-mini")).id === "gpt-4o-mini", "one model");
  const claude = [];
  for await (const m of an.models.list({ limit: 2 })) claude.push(m.id); // follows the pages
  expect(claude.length > 2 && claude.every((i) => i.startsWith("claude-")), claude);
  const n = await an.messages.countTokens({ model: "claude-sonnet-4-5", messages: MESSAGES });
  expect(n.input_tokens > 5, n);
  await sleep(200);
  expect((await rows(KEY_ID)).length === before, "passthrough calls leave no ledger row");
}

// requests:day=1 and requests:total=1: the second call is refused. The limit cannot
// clear within a minute, so tollgate sends `x-should-retry: false` and the SDK throws at
// once (with its default retries on). No refusal leaves a ledger row.
async function rateLimited() {
  const sdks = {
    openai: (k) =>
      new OpenAI({ baseURL: `${BASE}/v1`, apiKey: k }).chat.completions.create({
        model: "gpt-4o-mini",
        messages: MESSAGES,
        max_tokens: 20,
      }),
    anthropic: (k) =>
      new Anthropic({ baseURL: BASE, apiKey: k }).messages.create({
        model: "claude-sonnet-4-5",
        max_tokens: 20,
        messages: MESSAGES,
      }),
  };
  for (const [name, make] of Object.entries(sdks)) {
    for (const window of ["DAY", "TOTAL"]) {
      const key = ENV[`TG_${window}_${name.toUpperCase()}_KEY`];
      const keyId = ENV[`TG_${window}_${name.toUpperCase()}_KEY_ID`];
      await make(key);
      const before = await counter(EXCEEDED);
      let refused = null;
      try {
        await make(key);
      } catch (e) {
        refused = e;
      }
      const RateLimitError = name === "openai" ? OpenAI.RateLimitError : Anthropic.RateLimitError;
      expect(refused instanceof RateLimitError, `${name} ${window}: ${refused}`);
      expect(refused.status === 429, `${refused}`);
      const retryAfter = refused.headers.get("retry-after");
      if (window === "DAY") expect(Number(retryAfter) > 60, `retry-after: ${retryAfter}`);
      else expect(retryAfter === null, "a total allowance never frees");
      expect(refused.headers.get("x-should-retry") === "false", "x-should-retry: false");
      const code = refused.error?.code ?? refused.error?.error?.code;
      expect(code === "quota_exceeded", refused.error);
      const attempts = (await counter(EXCEEDED)) - before;
      expect(attempts === 1, `${name} ${window}: ${attempts} attempts`);
      await sleep(100);
      const ledger = await rows(keyId);
      expect(ledger.length === 1, `${name} ${window}: one row, the admitted request`);
    }
  }
}

// The SDKs retry a 409 (twice, by default) unless told not to: a request repeating a
// settled Idempotency-Key is refused with `x-should-retry: false`, so the SDK throws at
// once, and the trace keeps its one ledger row.
async function duplicateWithDefaultRetries() {
  const sdks = [
    [
      "openai",
      (o) =>
        oa.chat.completions.create({ model: "gpt-4o-mini", messages: MESSAGES, max_tokens: 20 }, o),
      OpenAI.ConflictError,
    ],
    [
      "anthropic",
      (o) =>
        an.messages.create({ model: "claude-sonnet-4-5", max_tokens: 20, messages: MESSAGES }, o),
      Anthropic.ConflictError,
    ],
  ];
  for (const [name, call, ConflictError] of sdks) {
    const [opts, t] = trace();
    await call(opts);
    await settledRow(KEY_ID, t);
    const before = await counter(DUPLICATES);
    let refused = null;
    try {
      await call(opts);
    } catch (e) {
      refused = e;
    }
    expect(refused instanceof ConflictError && refused.status === 409, `${name}: ${refused}`);
    expect(refused.headers.get("x-tollgate-trace-id") === t, "the trace id names the retry");
    expect(refused.headers.get("x-should-retry") === "false", "x-should-retry: false");
    const attempts = (await counter(DUPLICATES)) - before;
    expect(attempts === 1, `${name}: one request, no retry of a duplicate, got ${attempts}`);
    const same = (await rows(KEY_ID)).filter((r) => r.trace_id === t);
    expect(same.length === 1 && same[0].status === "settled", same);
  }
}

async function unauthorized() {
  let e = null;
  try {
    await new OpenAI({ baseURL: `${BASE}/v1`, apiKey: "tg_not_a_key" }).models.list();
  } catch (err) {
    e = err;
  }
  expect(e instanceof OpenAI.AuthenticationError && e.status === 401, `${e}`);
  expect(e.code === "invalid_api_key", e.error);
  e = null;
  try {
    await new Anthropic({ baseURL: BASE, apiKey: "tg_not_a_key" }).messages.create({
      model: "claude-sonnet-4-5",
      max_tokens: 20,
      messages: MESSAGES,
    });
  } catch (err) {
    e = err;
  }
  expect(e instanceof Anthropic.AuthenticationError && e.status === 401, `${e}`);
  expect(e.error?.error?.type === "authentication_error", e.error);
}

const CHECKS = [
  chatNonStream,
  chatStreamWithoutUsage,
  chatStreamWithUsage,
  responsesStream,
  embeddings,
  anthropicNonStream,
  anthropicStreamHelper,
  modelsAndCountTokens,
  rateLimited,
  duplicateWithDefaultRetries,
  unauthorized,
];

const version = (p) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${p}/package.json`, import.meta.url))).version;
console.log(`node ${process.version}, openai ${version("openai")}, @anthropic-ai/sdk ${version("@anthropic-ai/sdk")}`);
let failed = 0;
for (const check of CHECKS) {
  try {
    await check();
    console.log(`ok   ${check.name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${check.name}: ${e?.stack ?? e}`);
  }
}
console.log(`${CHECKS.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
