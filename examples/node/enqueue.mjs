#!/usr/bin/env node
// Route one prompt through llm-router from Node.js, with node-redis and nothing else.
//
//   node enqueue.mjs [--schema FILE] [--chain NAME] [--context LABEL] [--timeout SECONDS] PROMPT
//
// The same protocol as ../enqueue.sh (docs/protocol.md): one MULTI writes the job
// (arq:job:<id>), queues it (ZADD <queue>) and wakes a worker (LPUSH <queue>:wake);
// the worker pushes the result blob to the reply list named in the job, and the
// result is its "r". Settings: LLM_ROUTER_REDIS_URL, LLM_ROUTER_QUEUE_NAME.
// Exit status: 0 ok; 1 failed or invalid_request (printed all the same); 2 usage;
// 3 Redis unreachable; 4 no result within --timeout (default 120 s).
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { createClient } from "redis";

function fail(code, message) {
  process.stderr.write(`enqueue.mjs: ${message}\n`);
  process.exit(code);
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      schema: { type: "string" },
      chain: { type: "string" },
      context: { type: "string" },
      timeout: { type: "string", default: "120" },
    },
  });
} catch (err) {
  fail(2, `usage: ${err.message}`);
}
const { values, positionals } = parsed;
if (positionals.length !== 1 || !/^\d+$/.test(values.timeout)) {
  fail(2, "usage: enqueue.mjs [--schema FILE] [--chain NAME] [--context LABEL] [--timeout SECONDS] PROMPT");
}

const request = { messages: [{ role: "user", content: positionals[0] }] };
if (values.schema) {
  try {
    request.schema = JSON.parse(readFileSync(values.schema, "utf8"));
  } catch (err) {
    fail(2, `cannot read schema ${values.schema}: ${err.message}`);
  }
}
if (values.chain) request.chain = values.chain;
if (values.context) request.context = values.context;

const url = process.env.LLM_ROUTER_REDIS_URL || "redis://127.0.0.1:6379/0";
const queue = process.env.LLM_ROUTER_QUEUE_NAME || "llm_router:queue";
const id = randomUUID().replaceAll("-", "");
const reply = `llm_router:reply:node-${id}`;
const now = Date.now();
const blob = JSON.stringify({ t: 1, f: "route", a: [request], k: { reply_to: reply }, et: now });

// No reconnecting for ever: a producer wants to hear at once that Redis is away.
const redis = createClient({ url, socket: { connectTimeout: 5000, reconnectStrategy: false } });
redis.on("error", () => {}); // reported where the command fails, without the URL
let answer;
try {
  await redis.connect();
  await redis
    .multi()
    .set(`arq:job:${id}`, blob, { PX: 86_400_000 })
    .zAdd(queue, { score: now, value: id })
    .lPush(`${queue}:wake`, "1")
    .lTrim(`${queue}:wake`, 0, 99)
    .exec();
  answer = await redis.blPop(reply, Number(values.timeout));
} catch (err) {
  fail(3, `cannot reach Redis: ${err.name}`); // never the URL: it may hold a password
} finally {
  if (redis.isOpen) await redis.quit().catch(() => {});
}
if (answer === null) fail(4, `no result for job ${id} within ${values.timeout}s`);

const result = JSON.parse(answer.element).r;
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(result.status === "ok" ? 0 : 1);
