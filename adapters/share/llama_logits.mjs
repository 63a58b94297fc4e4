// llama.cpp's logits for given token ids, through node-llama-cpp's prebuilt binary.
//
// Called by adapters/share/llama_runtime.py (export verification), never by hand:
//   node llama_logits.mjs REQUEST.json
// REQUEST: {"modules": node_modules folder, "model": GGUF, "lora": LoRA GGUF or null,
//           "prompts": [[token id, ...], ...], "threads": N, "out": file,
//           "greedy": 0, or N: instead of logits, each prompt's greedy continuation of up to
//           N tokens (argmax of the raw logits, stopping at an end-of-generation token),
//           written to "out" as JSON [[token id, ...], ...]}
// Writes to "out" the float32 logits (T, V) of every prompt, one after another (V: llama.cpp's
// vocabulary, as many logits as it returns per position), and prints one JSON line:
// {"release", "n_vocab", "positions"}. The caller checks V against its own vocabulary.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const req = JSON.parse(readFileSync(process.argv[2], "utf8"));
const entry = join(req.modules, "node-llama-cpp", "dist", "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);

// build "never" + no download: the prebuilt CPU binary from npm or nothing (no network).
const llama = await getLlama({
  gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
  progressLogs: false, logLevel: LlamaLogLevel.error,
});
const model = await llama.loadModel({ modelPath: req.model });
const longest = Math.max(...req.prompts.map((p) => p.length)) + (req.greedy || 0);
const context = await model.createContext({
  contextSize: longest + 8, batchSize: longest + 8, sequences: 1, threads: req.threads,
  ...(req.lora ? { lora: { adapters: [{ filePath: req.lora, scale: 1 }] } } : {}),
});
// One sequence, cleared between prompts: each prompt is evaluated from an empty cache.
const sequence = context.getSequence();
if (req.greedy) {
  const argmax = (logits) => {
    let best = -1, top = -Infinity;
    for (const [token, value] of logits) if (value > top) { top = value; best = token; }
    return best;
  };
  const outs = [];
  for (const prompt of req.prompts) {
    await sequence.clearHistory();
    const res = await sequence.controlledEvaluate(
      prompt.map((t, i) => i === prompt.length - 1 ? [t, { generateNext: { logits: true } }] : t));
    let next = argmax(res[prompt.length - 1].next.logits);
    const got = [];
    while (got.length < req.greedy && !model.isEogToken(next)) {
      got.push(next);
      if (got.length === req.greedy) break;
      const step = await sequence.controlledEvaluate([[next, { generateNext: { logits: true } }]]);
      next = argmax(step[0].next.logits);
    }
    outs.push(got);
  }
  writeFileSync(req.out, JSON.stringify(outs));
  console.log(JSON.stringify({ release: llama.llamaCppRelease.release, prompts: outs.length }));
  await context.dispose();
  await model.dispose();
  await llama.dispose();
  process.exit(0);
}
const total = req.prompts.reduce((n, p) => n + p.length, 0);
let V = 0;
let out = null; // (total, V) float32, allocated once the first position tells V
let row = 0;
for (const prompt of req.prompts) {
  await sequence.clearHistory();
  const items = prompt.map((t) => [t, { generateNext: { logits: true } }]);
  const res = await sequence.controlledEvaluate(items);
  for (let i = 0; i < prompt.length; i++) {
    const logits = res[i]?.next?.logits;
    if (!logits) throw new Error(`llama.cpp returned no logits at position ${i}`);
    if (out === null) {
      V = logits.size;
      out = new Float32Array(total * V);
    }
    if (logits.size !== V) throw new Error(`${logits.size} logits at a position, not ${V}`);
    const base = (row + i) * V;
    for (const [token, value] of logits) out[base + token] = value;
  }
  row += prompt.length;
}
writeFileSync(req.out, Buffer.from(out.buffer));
console.log(JSON.stringify({ release: llama.llamaCppRelease.release, n_vocab: V,
                             positions: total }));
await context.dispose();
await model.dispose();
await llama.dispose();
