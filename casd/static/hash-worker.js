// Hashes a File off the main thread: casd.js starts this as a module Worker.
//
// Two kinds of job:
//   {file, chunkSize, algo, whole, chunks, forward?}  read the file by slices, hash the whole
//       file and/or each chunk; with `forward` (a MessagePort), hand every slice on to a
//       second worker after hashing it, so the file is read once for both digests.
//   {algo, source}  hash the chunks whose slices arrive on the MessagePort `source`.
// Messages out: {type: "progress", bytes}  bytes hashed so far by this worker
//               {type: "done", digest, chunks}  whole-file digest and chunk digests in file
//                                               order, each null when not asked for
//               {type: "error", message}
//
// Slices are at most SLICE bytes and never straddle a chunk boundary. Memory stays at a few
// slices whatever the file size: READS_IN_FLIGHT reads ahead, and at most FORWARD_WINDOW
// slices handed on but not yet hashed by the second worker.

import { Md5 } from "./md5.js";
import { Sha256 } from "./sha256.js";

const SLICE = 8 * 1024 * 1024;
// Chromium reads a File through its browser process: one 8 MiB read at a time measured
// 445 MB/s from disk, two in flight 554, four 643.
const READS_IN_FLIGHT = 2;
const FORWARD_WINDOW = 2;

const hasherFor = (algo) => (algo === "sha256" ? Sha256 : Md5);

function* slices(size, chunkSize) {
  for (let chunkStart = 0; chunkStart < size; chunkStart += chunkSize) {
    const chunkEnd = Math.min(size, chunkStart + chunkSize);
    for (let start = chunkStart; start < chunkEnd; start += SLICE) {
      const end = Math.min(chunkEnd, start + SLICE);
      yield { start, end, first: start === chunkStart, last: end === chunkEnd };
    }
  }
}

// WebCrypto hashes a whole buffer natively, many times faster than JS; it exists only in
// secure contexts (https, localhost), hence the fallback to our own code.
const subtle = globalThis.isSecureContext ? globalThis.crypto?.subtle : undefined;

function hexOf(buffer) {
  let s = "";
  for (const b of new Uint8Array(buffer)) s += (b < 16 ? "0" : "") + b.toString(16);
  return s;
}

// Feeds slices to a chunk hasher; collects one digest per chunk. A SHA-256 chunk that
// arrives in one slice goes to WebCrypto when it is available.
function chunkDigester(algo) {
  const Hasher = hasherFor(algo);
  const native = algo === "sha256" && subtle !== undefined;
  const digests = [];
  let current = null;
  return {
    digests,
    async feed(s, buf) {
      if (native && s.first && s.last) {
        digests.push(hexOf(await subtle.digest("SHA-256", buf)));
        return;
      }
      if (s.first) current = new Hasher();
      current.update(buf);
      if (s.last) digests.push(current.hex());
    },
  };
}

// Resolves each time the other worker acknowledges a slice: the forwarding window.
function acks(port) {
  let credit = FORWARD_WINDOW;
  let waiter = null;
  port.onmessage = () => {
    credit += 1;
    if (waiter) {
      waiter();
      waiter = null;
    }
  };
  return async () => {
    while (credit === 0) await new Promise((resolve) => { waiter = resolve; });
    credit -= 1;
  };
}

async function readAndHash({ file, chunkSize, algo, whole, chunks, forward }) {
  const Hasher = hasherFor(algo);
  const fileHasher = whole ? new Hasher() : null;
  const chunker = chunks ? chunkDigester(algo) : null;
  const takeCredit = forward ? acks(forward) : null;
  const plan = slices(file.size, chunkSize);
  const read = (s) => file.slice(s.start, s.end).arrayBuffer().then((buf) => ({ s, buf }));
  const reads = [];
  const refill = () => {
    while (reads.length < READS_IN_FLIGHT) {
      const step = plan.next();
      if (step.done) return;
      reads.push(read(step.value));
    }
  };
  refill();
  while (reads.length > 0) {
    const { s, buf } = await reads.shift();
    refill();
    if (buf.byteLength !== s.end - s.start) {
      throw new Error(`the file changed while it was read (${file.name || "blob"})`);
    }
    if (fileHasher !== null) fileHasher.update(buf);
    if (chunker !== null) await chunker.feed(s, buf);
    if (forward) {
      await takeCredit();
      forward.postMessage({ s, buf }, [buf]);
    }
    self.postMessage({ type: "progress", bytes: s.end });
  }
  if (forward) forward.postMessage({ end: true });
  return {
    digest: fileHasher === null ? null : fileHasher.hex(),
    chunks: chunker === null ? null : chunker.digests,
  };
}

function hashForwarded({ algo, source }) {
  const chunker = chunkDigester(algo);
  // Slices are fed strictly in order, even though feed() may await WebCrypto.
  let queue = Promise.resolve();
  return new Promise((resolve, reject) => {
    source.onmessage = ({ data }) => {
      queue = queue.then(async () => {
        if (data.end) {
          resolve({ digest: null, chunks: chunker.digests });
          return;
        }
        await chunker.feed(data.s, data.buf);
        source.postMessage(null);
        self.postMessage({ type: "progress", bytes: data.s.end });
      }).catch(reject);
    };
  });
}

self.onmessage = async ({ data }) => {
  try {
    const result = data.source ? await hashForwarded(data) : await readAndHash(data);
    self.postMessage({ type: "done", ...result });
  } catch (err) {
    self.postMessage({ type: "error", message: String((err && err.message) || err) });
  }
};
