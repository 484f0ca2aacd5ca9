// casd browser client: hash a File in Web Workers, ask the server what it lacks, send only
// that through a bounded queue, merge. The protocol is docs/PROTOCOL.md: v1.1 (chunks
// listed and sent while the file is still being hashed) when the server offers it, else
// v1; the Python client (casd.client) follows the same defaults, retry rules and phases.
//
//   import { upload } from "/static/casd.js";
//   const summary = await upload(file, { onProgress: (p) => console.log(p) });
//
// The server's handshake is the only state: calling upload() again with the same file
// (after a reload, a crash or an abort) sends only the chunks the server still lacks.

import { DEFAULT_AVG, fastcdcParams } from "./fastcdc.js";
import { Md5 } from "./md5.js";
import { Sha256 } from "./sha256.js";

export const MiB = 1024 * 1024;
export const DEFAULT_CHUNK_SIZE = 5 * MiB;
// FastCDC's default average (as casd.chunking.DEFAULT_FASTCDC_AVG).
export const DEFAULT_FASTCDC_AVG = DEFAULT_AVG;
// How upload() cuts a file when told nothing, as the Python client's DEFAULT_CHUNKING.
export const DEFAULT_CHUNKING = "fixed";
// Four chunk requests in flight leave two of the browser's six HTTP/1.1 connections per
// host for the handshake, the merge and the page (as casd.client.DEFAULT_CONCURRENCY).
export const DEFAULT_CONCURRENCY = 4;
export const DEFAULT_RETRIES = 6;

const ALGOS = new Set(["md5", "sha256"]);
const EXT = /^\.[A-Za-z0-9_-]{1,16}$/;
// Below this size a second hashing worker costs more to start than it saves.
const SPLIT_MIN_SIZE = 16 * MiB;
// Rounds of handshake -> chunks -> merge before giving up: a round only repeats when the
// server lost the upload (expired, aborted) or still misses chunks at merge time.
const MAX_ROUNDS = 3;
const BACKOFF_BASE_MS = 250;
const BACKOFF_MAX_MS = 8_000; // as the Python client: 0.25 s doubling, at most 8 s
// A chunk PUT asks for `{"stored": ...}` without the `missing` list (RFC 7240): that list
// is the whole remainder of the upload on every answer, quadratic over a huge manifest,
// and the queue already knows what it still has to send.
const PREFER_MINIMAL = "return=minimal";
// Protocol v1.1: a file of one chunk up to this size goes in one PUT /v1/files/... request
// when the server offers it (as casd.client.transfer.ONE_REQUEST_MAX).
const ONE_REQUEST_MAX = 1 * MiB;

/**
 * An error answer from casd (or a network failure: status 0, code "network_error").
 * `code` is the protocol's error code, as `CasdClientError.code` in Python; `error` is its
 * old name, kept as an alias. `retryAfter` is the server's Retry-After in seconds, or null.
 */
export class CasdError extends Error {
  constructor(status, code, message, body = {}, retryAfter = null) {
    super(message);
    this.name = "CasdError";
    this.status = status;
    this.code = code;
    this.body = body;
    this.retryAfter = retryAfter;
  }

  get error() {
    return this.code;
  }

  /** Network errors, 408, 429 and 5xx (507 included): the same request may succeed later. */
  get retryable() {
    return this.status === 0 || this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

/** Seconds from a Retry-After header (delta-seconds or an HTTP date), else null. */
function parseRetryAfter(value) {
  if (!value) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

function abortReason(signal) {
  return signal.reason ?? new DOMException("the upload was aborted", "AbortError");
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortReason(signal));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The extension casd accepts for a file name (".iso"), or "" when it has none it can take. */
export function extOf(name) {
  // As Python's os.path.splitext: leading dots belong to the stem (".bashrc" has none).
  const stem = String(name || "").replace(/^.*\//, "").replace(/^\.+/, "");
  const dot = stem.lastIndexOf(".");
  const ext = dot >= 0 ? stem.slice(dot) : "";
  return EXT.test(ext) ? ext.toLowerCase() : "";
}

/** The chunk layout of a file of `size` bytes: [{index, offset, size}], the last one shorter. */
export function chunkLayout(size, chunkSize) {
  const out = [];
  for (let offset = 0, index = 0; offset < size; offset += chunkSize, index++) {
    out.push({ index, offset, size: Math.min(chunkSize, size - offset) });
  }
  return out;
}

let shimUrl = null; // one blob: URL per page, kept for the page's lifetime

function startWorker() {
  const url = new URL("./hash-worker.js", import.meta.url);
  try {
    return new Worker(url, { type: "module" });
  } catch (err) {
    // A page importing casd.js from another origin may not start a worker from that
    // origin directly; a same-origin blob: module that imports it is allowed (given CORS).
    if (err?.name !== "SecurityError") throw err;
    shimUrl ??= URL.createObjectURL(
      new Blob([`import ${JSON.stringify(url.href)};`], { type: "text/javascript" }),
    );
    return new Worker(shimUrl, { type: "module" });
  }
}

// A browser hides why a cross-origin request failed; casd not allowing this page's origin
// is the likeliest reason, so the message names the flag that allows it.
function corsHint(root) {
  const here = globalThis.location?.origin;
  if (!here || here === "null") return "";
  let there;
  try {
    there = new URL(root || "/", globalThis.location.href).origin;
  } catch {
    return "";
  }
  return there === here ? "" : ` (casd lets a page on ${here} call it only when started with --cors-origin ${here})`;
}

function runWorker(job, transfer, signal, onBytes, onChunk) {
  return new Promise((resolve, reject) => {
    const worker = startWorker();
    const finish = (fn, value) => {
      worker.terminate();
      signal?.removeEventListener("abort", onAbort);
      fn(value);
    };
    const onAbort = () => finish(reject, abortReason(signal));
    signal?.addEventListener("abort", onAbort, { once: true });
    worker.onmessage = ({ data }) => {
      if (data.type === "progress") onBytes(data.bytes);
      else if (data.type === "chunk") onChunk?.(data);
      else if (data.type === "done") finish(resolve, data);
      else finish(reject, new Error(`hashing failed: ${data.message}`));
    };
    worker.onerror = (event) => {
      event.preventDefault?.();
      finish(reject, new Error(`the hashing worker failed to run: ${event.message || "load error"}`));
    };
    worker.postMessage(job, transfer);
  });
}

/**
 * Hashes `file` without touching the main thread's CPU: the whole-file digest and every
 * chunk's digest. With 2+ cores, one worker reads the file and computes the file digest,
 * and hands each slice on to a second worker that computes the chunk digests.
 * `chunking` "fastcdc" cuts by content (FastCDC 2020 as casd.chunking, `chunkSize` the
 * average, default 1 MiB), in the reading worker as the slices go by; "fixed" (the
 * default) cuts every `chunkSize` bytes (default 5 MiB).
 * Resolves to {algo, digest, size, chunking, chunkSize, chunks: [{index, offset, size, digest}]}.
 * `onChunk({offset, size, digest})`, when given, is called for each chunk in file order as
 * soon as its digest is known, long before the file's digest is.
 */
export async function hashFile(file, {
  chunking = "fixed", chunkSize, algo = "md5", workers, signal, onProgress, onChunk,
} = {}) {
  checkAlgo(algo);
  chunkSize = checkChunking(chunking, chunkSize);
  signal?.throwIfAborted();
  const size = file.size;
  const cdc = chunking === "fastcdc";
  if (size === 0) {
    const digest = (algo === "sha256" ? new Sha256() : new Md5()).hex();
    return { algo, digest, size, chunking, chunkSize, chunks: [] };
  }
  const cores = globalThis.navigator?.hardwareConcurrency ?? 1;
  const split = (workers ?? (cores >= 2 && size >= SPLIT_MIN_SIZE ? 2 : 1)) >= 2;
  const done = split ? [0, 0] : [0];
  const report = (i) => (bytes) => {
    done[i] = bytes;
    onProgress?.(done.reduce((a, b) => a + b, 0) / done.length);
  };
  const base = { file, chunkSize, chunking, algo };
  // One controller for both workers: when either fails, the other is stopped too.
  const stop = new AbortController();
  const onAbort = () => stop.abort(abortReason(signal));
  signal?.addEventListener("abort", onAbort, { once: true });
  const guarded = (promise) => promise.catch((err) => {
    stop.abort(err);
    throw err;
  });
  const stream = onChunk !== undefined;
  let jobs;
  if (split) {
    const { port1, port2 } = new MessageChannel();
    jobs = [
      runWorker({ ...base, whole: true, chunks: false, forward: port1 }, [port1], stop.signal, report(0)),
      runWorker({ algo, source: port2, stream }, [port2], stop.signal, report(1), onChunk),
    ];
  } else {
    jobs = [runWorker({ ...base, whole: true, chunks: true, stream }, [], stop.signal, report(0), onChunk)];
  }
  const settled = await Promise.allSettled(jobs.map(guarded));
  signal?.removeEventListener("abort", onAbort);
  const failed = settled.find((r) => r.status === "rejected");
  if (failed) throw signal?.aborted ? abortReason(signal) : failed.reason;
  const [first, second] = settled.map((r) => r.value);
  const digests = split ? second.chunks : first.chunks;
  const layout = cdc ? layoutOfEnds(first.ends) : chunkLayout(size, chunkSize);
  if (digests.length !== layout.length) throw new Error("hashing produced the wrong chunk count");
  return {
    algo,
    digest: first.digest,
    size,
    chunking,
    chunkSize,
    chunks: layout.map((c, i) => ({ ...c, digest: digests[i] })),
  };
}

function layoutOfEnds(ends) {
  return ends.map((end, index) => {
    const offset = index === 0 ? 0 : ends[index - 1];
    return { index, offset, size: end - offset };
  });
}

// Checks the chunking options; the chunk size to use (each kind's default when undefined).
function checkChunking(chunking, chunkSize) {
  if (chunking === "fastcdc") {
    chunkSize ??= DEFAULT_FASTCDC_AVG;
    try {
      fastcdcParams(chunkSize);
    } catch (err) {
      throw new TypeError(err.message);
    }
    return chunkSize;
  }
  if (chunking !== "fixed") {
    throw new TypeError(`chunking must be "fixed" or "fastcdc", not ${JSON.stringify(chunking)}`);
  }
  chunkSize ??= DEFAULT_CHUNK_SIZE;
  checkChunkSize(chunkSize);
  return chunkSize;
}

function checkAlgo(algo) {
  if (!ALGOS.has(algo)) throw new TypeError(`algo must be "md5" or "sha256", not ${JSON.stringify(algo)}`);
}

function checkChunkSize(chunkSize) {
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1) {
    throw new TypeError(`chunkSize must be a positive integer, not ${chunkSize}`);
  }
}

function errorFrom(status, text, retryAfter = null) {
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say; keep a short excerpt for the message
  }
  if (body && typeof body.error === "string") {
    const { error, message, ...extra } = body;
    return new CasdError(status, error, message || error, extra, parseRetryAfter(retryAfter));
  }
  const excerpt = String(text || "").replace(/\s+/g, " ").slice(0, 200);
  return new CasdError(status, `http_${status}`, `HTTP ${status}${excerpt ? ": " + excerpt : ""}`,
    {}, parseRetryAfter(retryAfter));
}

// What GET /v1/capabilities answered, per server root; {} for a server that does not
// have it (protocol v1) or could not be asked (the handshake then says what is wrong).
const capabilitiesOf = new Map();

async function capabilities(root, headers) {
  if (!capabilitiesOf.has(root)) {
    let caps = {};
    try {
      const response = await fetch(root + "/v1/capabilities", { headers });
      if (response.ok) caps = await response.json();
      else if (response.status !== 404 && response.status !== 405) return {};
    } catch {
      return {};
    }
    capabilitiesOf.set(root, caps);
  }
  return capabilitiesOf.get(root);
}

/**
 * Uploads `file` (a File or Blob) to casd and resolves to the summary
 * {digest, algo, size, url, chunks_total, chunks_sent, bytes_sent, chunks_skipped,
 *  bytes_skipped, instant, name, hash_seconds, transfer_seconds, merge_seconds, seconds}:
 * the Python client's UploadSummary, with the file's name in place of its path.
 * "sent" counts chunks this call sent and the server acknowledged; sent + skipped = total.
 */
export async function upload(file, options = {}) {
  const {
    server = "",
    chunking = DEFAULT_CHUNKING,
    chunkSize: givenChunkSize,
    concurrency = DEFAULT_CONCURRENCY,
    algo = "md5",
    onProgress,
    signal,
    token,
    retries = DEFAULT_RETRIES,
    name: givenName = file.name ?? "",
    ext = extOf(givenName),
    hashWorkers,
  } = options;
  checkAlgo(algo);
  const chunkSize = checkChunking(chunking, givenChunkSize);
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new TypeError(`concurrency must be an integer >= 1, not ${concurrency}`);
  }
  signal?.throwIfAborted();
  const name = Array.from(String(givenName)).slice(0, 255).join(""); // the server's limit

  const root = String(server).replace(/\/+$/, "");
  const endpoint = (path) => root + path;
  const absolute = (path) => new URL(
    /^[a-z]+:/i.test(path) ? path : endpoint(path),
    globalThis.location?.href,
  ).href;
  const headers = token ? { Authorization: `Bearer ${token}` } : {};

  const size = file.size;
  const state = {
    phase: "hashing",
    size,
    bytes_hashed: 0,
    chunks_total: 0,
    chunks_to_send: 0,
    chunks_sent: 0,
    bytes_sent: 0,
    bytes_in_flight: 0,
    chunks_skipped: 0,
    bytes_skipped: 0,
    retries: 0,
    upload_id: null,
  };
  const emit = () => onProgress?.({ ...state });
  emit();

  const clock = () => performance.now() / 1000;
  const started = clock();
  let mergeSeconds = 0;
  let hashSeconds = 0;
  const hashOptions = {
    chunking, chunkSize, algo, signal, workers: hashWorkers,
    onProgress: (bytes) => {
      state.bytes_hashed = bytes;
      emit();
    },
  };

  // One request with retries: network errors, 408, 429 and 5xx (507 included) are retried
  // with exponential backoff and full jitter, or after the server's Retry-After (capped as
  // the backoff is); other answers surface at once.
  async function retrying(attempt, abortSignal = signal) {
    for (let n = 0; ; n++) {
      try {
        return await attempt();
      } catch (err) {
        if (!(err instanceof CasdError) || !err.retryable || n >= retries || abortSignal?.aborted) {
          throw err;
        }
        state.retries += 1;
        emit();
        const delay = err.retryAfter !== null
          ? Math.min(BACKOFF_MAX_MS, err.retryAfter * 1000)
          : Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** n);
        await sleep(delay, abortSignal);
      }
    }
  }

  // One request by fetch, retried as `retrying` says: [status, the JSON answer].
  function fetchJson(method, path, contentType, body) {
    return retrying(async () => {
      let response, text;
      try {
        response = await fetch(endpoint(path), {
          method,
          headers: { ...headers, "Content-Type": contentType },
          body,
          signal,
        });
        text = await response.text();
      } catch (err) {
        if (signal?.aborted) throw abortReason(signal);
        throw new CasdError(0, "network_error", `cannot reach casd at ${absolute("/")}: ${err.message}${corsHint(root)}`);
      }
      if (!response.ok) throw errorFrom(response.status, text, response.headers.get("Retry-After"));
      return [response.status, JSON.parse(text)];
    });
  }

  async function postJson(path, body) {
    const json = body === undefined ? undefined : JSON.stringify(body);
    return (await fetchJson("POST", path, "application/json", json))[1];
  }

  // PUT by XMLHttpRequest rather than fetch: it streams the Blob slice from disk and
  // reports upload progress, which fetch cannot.
  function putOnce(path, blob, onSent, abortSignal) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      const onAbort = () => xhr.abort();
      const settle = (fn, value) => {
        abortSignal.removeEventListener("abort", onAbort);
        fn(value);
      };
      xhr.open("PUT", endpoint(path));
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("Prefer", PREFER_MINIMAL);
      xhr.upload.onprogress = (e) => onSent(e.loaded);
      xhr.onload = () => {
        if (xhr.status < 200 || xhr.status >= 300) {
          settle(reject, errorFrom(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After")));
          return;
        }
        // 201 stored, 200 already held: either way the chunk is there; the body says no more.
        settle(resolve, xhr.status);
      };
      xhr.onerror = () => settle(reject, new CasdError(0, "network_error", `the chunk upload to ${absolute(path)} failed${corsHint(root)}`));
      xhr.ontimeout = xhr.onerror;
      xhr.onabort = () => settle(reject, abortReason(abortSignal));
      abortSignal.addEventListener("abort", onAbort, { once: true });
      xhr.send(blob);
    });
  }

  const digestKey = algo;
  const firstOf = new Map(); // digest -> the first chunk of the file that has it
  const sentDigests = new Set();

  // Sends the chunks `missing` names, at most `concurrency` at a time. The first failure
  // stops the queue and aborts the requests still in flight.
  async function sendMissing(uploadId, missing) {
    return sendChunks(uploadId, missing.map((d) => firstOf.get(d)));
  }

  // Sends the chunks of `queue` (an array that may still grow while it is sent, when
  // `more` is a promise that settles once nothing more will be added).
  async function sendChunks(uploadId, queue, more = null) {
    if (queue.some((c) => c === undefined)) {
      throw new CasdError(0, "protocol_error", "the server asked for a chunk that is not in this file");
    }
    const stop = new AbortController();
    const onAbort = () => stop.abort(abortReason(signal));
    signal?.addEventListener("abort", onAbort, { once: true });
    const inFlight = new Map();
    let next = 0;
    let ended = more === null;
    const waiting = [];
    const wake = () => waiting.splice(0).forEach((resolve) => resolve());
    more?.finally(() => {
      ended = true;
      wake();
    });
    queue.grew = wake;
    stop.signal.addEventListener("abort", wake, { once: true });
    async function worker() {
      while (!stop.signal.aborted) {
        if (next >= queue.length) {
          if (ended) return;
          await new Promise((resolve) => waiting.push(resolve));
          continue;
        }
        const chunk = queue[next++];
        const path = `/v1/uploads/${encodeURIComponent(uploadId)}/chunks/${chunk.digest}`;
        const blob = file.slice(chunk.offset, chunk.offset + chunk.size);
        await retrying(() => {
          inFlight.set(chunk.digest, 0);
          return putOnce(path, blob, (loaded) => {
            inFlight.set(chunk.digest, Math.min(loaded, chunk.size));
            state.bytes_in_flight = [...inFlight.values()].reduce((a, b) => a + b, 0);
            emit();
          }, stop.signal);
        }, stop.signal).finally(() => inFlight.delete(chunk.digest));
        // Counted once per digest, even if a lost upload made us send it again.
        if (!sentDigests.has(chunk.digest)) {
          sentDigests.add(chunk.digest);
          state.chunks_sent += 1;
          state.bytes_sent += chunk.size;
        }
        state.bytes_in_flight = [...inFlight.values()].reduce((a, b) => a + b, 0);
        emit();
      }
    }
    try {
      const workers = more === null ? Math.min(concurrency, queue.length) : concurrency;
      await Promise.all(Array.from({ length: workers }, async () => {
        try {
          await worker();
        } catch (err) {
          stop.abort(err);
          throw err;
        }
      }));
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
    if (signal?.aborted) throw abortReason(signal);
  }

  function finish(answer, instant) {
    state.phase = "done";
    state.bytes_in_flight = 0;
    state.chunks_skipped = state.chunks_total - state.chunks_sent;
    state.bytes_skipped = size - state.bytes_sent;
    emit();
    return {
      digest: answer[digestKey],
      algo,
      size,
      url: absolute(answer.url),
      chunks_total: state.chunks_total,
      chunks_sent: state.chunks_sent,
      bytes_sent: state.bytes_sent,
      chunks_skipped: state.chunks_skipped,
      bytes_skipped: state.bytes_skipped,
      instant,
      name,
      hash_seconds: hashSeconds,
      transfer_seconds: clock() - started - hashSeconds - mergeSeconds,
      merge_seconds: mergeSeconds,
      seconds: clock() - started,
    };
  }

  // Protocol v1.1: open the upload, list each batch of chunks as the workers hash them,
  // send those the server lacks at once, give the file's digest at merge. Resolves to the
  // summary, or to null when the server lost the upload (v1 then takes over, as a rerun).
  async function streamUpload() {
    let opened;
    try {
      opened = await postJson("/v1/uploads", { algo, ext, name, size: file.size });
    } catch (err) {
      // Restarted without v1.1 since it was asked: ask again next time, use v1 now.
      if (!(err instanceof CasdError && err.code === "not_found")) throw err;
      capabilitiesOf.delete(root);
      return null;
    }
    const uploadId = opened.upload_id;
    state.upload_id = uploadId;
    const path = `/v1/uploads/${encodeURIComponent(uploadId)}`;
    const listed = []; // chunks hashed, not yet listed
    const toSend = [];
    const queued = new Set();
    let count = 0;
    let batching = null; // the one batch request in flight
    let failed = null;
    const listBatches = async () => {
      while (listed.length > 0 && failed === null) {
        const batch = listed.splice(0, maxBatch);
        let missing;
        try {
          const answer = await postJson(`${path}/chunks`, {
            algo, start: count, chunks: batch.map((c) => ({ [digestKey]: c.digest, size: c.size })),
          });
          missing = new Set(answer.missing);
        } catch (err) {
          // An answer lost on the way: the batch is in; sending all of it is safe.
          if (!(err instanceof CasdError && err.code === "offset_mismatch"
            && err.body.count === count + batch.length)) throw err;
          missing = new Set(batch.map((c) => c.digest));
        }
        count += batch.length;
        for (const c of batch) {
          if (missing.has(c.digest) && !queued.has(c.digest)) {
            queued.add(c.digest);
            toSend.push(c);
          }
        }
        state.chunks_to_send = toSend.length;
        toSend.grew?.();
      }
    };
    const kick = () => {
      batching ??= listBatches().catch((err) => {
        failed ??= err;
        stop.abort(err);
      }).finally(() => {
        batching = null;
        if (listed.length > 0 && failed === null) kick();
      });
    };
    const stop = new AbortController();
    const onAbort = () => stop.abort(abortReason(signal));
    signal?.addEventListener("abort", onAbort, { once: true });
    let index = 0;
    const hashing = hashFile(file, {
      ...hashOptions,
      signal: stop.signal,
      onChunk: ({ offset, size: n, digest }) => {
        const chunk = { index: index++, offset, size: n, digest };
        if (!firstOf.has(digest)) firstOf.set(digest, chunk);
        listed.push(chunk);
        state.chunks_total = index;
        kick();
      },
    });
    // Settles once every batch is listed: hashing done, then the last batch answered.
    const allListed = hashing.then(async () => {
      while (batching !== null) await batching;
      if (failed !== null) throw failed;
    });
    let hashed;
    try {
      const sending = sendChunks(uploadId, toSend, allListed.catch(() => {}));
      sending.catch((err) => stop.abort(err)); // a failed PUT stops the hashing too
      hashed = await hashing;
      hashSeconds = clock() - started;
      state.chunks_total = hashed.chunks.length;
      if (state.phase === "hashing") {
        state.phase = "uploading";
        emit();
      }
      await allListed;
      await sending;
    } catch (err) {
      stop.abort(err);
      signal?.removeEventListener("abort", onAbort);
      const lost = err instanceof CasdError && (err.code === "not_found" || err.code === "incomplete");
      if (lost && !signal?.aborted) return null;
      // Give the upload back so it stops counting against this client's pending budget.
      fetch(endpoint(path), { method: "DELETE", headers }).catch(() => {});
      throw err;
    }
    signal?.removeEventListener("abort", onAbort);
    state.phase = "merging";
    emit();
    const mergeStarted = clock();
    try {
      const merged = await postJson(`${path}/merge`, { algo, [digestKey]: hashed.digest, size });
      mergeSeconds = clock() - mergeStarted;
      // The merge found the file stored already (and hashed nothing again).
      return finish(merged, merged.instant === true && state.chunks_sent === 0);
    } catch (err) {
      if (err instanceof CasdError && (err.code === "not_found" || err.code === "incomplete")) return null;
      throw err;
    }
  }

  // Protocol v1.1: one request for a file of one chunk, verified by the server as a
  // handshake, a chunk PUT and a merge would be. 201: stored now; 200: it was complete.
  async function putFile(hashed) {
    const query = name ? `?name=${encodeURIComponent(name)}` : "";
    const path = `/v1/files/${hashed.digest}${ext}${query}`;
    state.phase = "uploading";
    state.chunks_to_send = hashed.chunks.length;
    emit();
    const [status, answer] = await fetchJson("PUT", path, "application/octet-stream", file);
    if (status === 201) {
      state.chunks_sent = hashed.chunks.length;
      state.bytes_sent = size;
    }
    return finish(answer, status !== 201);
  }

  let maxBatch = 1024;
  const caps = await capabilities(root, headers);
  const oneChunk = chunking === "fixed" ? chunkSize : chunkSize / 4;
  if (caps.file_put === true && size <= Math.min(oneChunk, ONE_REQUEST_MAX)) {
    const hashed = await hashFile(file, hashOptions);
    state.chunks_total = hashed.chunks.length;
    hashSeconds = clock() - started;
    if (hashed.chunks.length <= 1) return putFile(hashed);
  }
  if (caps.stream_uploads === true) {
    if (Number.isSafeInteger(caps.max_batch) && caps.max_batch >= 1) maxBatch = caps.max_batch;
    const summary = await streamUpload();
    if (summary !== null) return summary;
  }

  const hashed = await hashFile(file, hashOptions);
  state.chunks_total = hashed.chunks.length;
  hashSeconds = clock() - started;
  for (const c of hashed.chunks) if (!firstOf.has(c.digest)) firstOf.set(c.digest, c);
  const handshakeBody = {
    algo,
    [digestKey]: hashed.digest,
    size,
    ext,
    name,
    chunks: hashed.chunks.map((c) => ({ [digestKey]: c.digest, size: c.size })),
  };

  for (let round = 1; ; round++) {
    state.phase = "handshake";
    emit();
    const answer = await postJson("/v1/handshake", handshakeBody);
    if (answer.status === "complete") return finish(answer, state.chunks_sent === 0);
    state.upload_id = answer.upload_id;
    const toSend = answer.missing.filter((d) => !sentDigests.has(d));
    const sendBytes = toSend.reduce((n, d) => n + (firstOf.get(d)?.size ?? 0), 0);
    state.chunks_to_send = state.chunks_sent + toSend.length;
    state.chunks_skipped = state.chunks_total - state.chunks_to_send;
    state.bytes_skipped = size - state.bytes_sent - sendBytes;
    state.phase = "uploading";
    emit();
    try {
      await sendMissing(answer.upload_id, answer.missing);
      state.phase = "merging";
      emit();
      const mergeStarted = clock();
      const merged = await postJson(`/v1/uploads/${encodeURIComponent(answer.upload_id)}/merge`);
      mergeSeconds = clock() - mergeStarted;
      return finish(merged, false);
    } catch (err) {
      // The server lost the upload or still lacks chunks: a fresh handshake says what to do.
      const recoverable = err instanceof CasdError
        && (err.code === "not_found" || err.code === "incomplete");
      if (!recoverable || round >= MAX_ROUNDS || signal?.aborted) throw err;
    }
  }
}
