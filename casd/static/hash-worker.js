// Hashes a File off the main thread: casd.js starts this as a module Worker.
//
// Two kinds of job:
//   {file, chunkSize, chunking?, algo, whole, chunks, forward?}  read the file by slices,
//       hash the whole file and/or each chunk; with `forward` (a MessagePort), hand every
//       slice on to a second worker after hashing it, so the file is read once for both
//       digests. `chunking` "fastcdc" cuts chunks by content (fastcdc.js, `chunkSize` the
//       average) as the slices go by; the default "fixed" cuts every `chunkSize` bytes.
//   {algo, source}  hash the chunks whose slices arrive on the MessagePort `source`.
// With `stream: true` in the job of the worker that hashes chunks, each chunk is also
// announced as soon as its digest is known: {type: "chunk", offset, size, digest}, in file
// order (protocol v1.1 lists chunks while the file is still being hashed).
// Messages out: {type: "progress", bytes}  bytes hashed so far by this worker
//               {type: "done", digest, chunks, ends}  whole-file digest, chunk digests in
//                   file order (each null when not asked for), and with fastcdc the chunk
//                   end offsets the reading worker cut (else null)
//               {type: "error", message}
//
// A piece is the part of a slice inside one chunk: {start, end, first, last}. With fixed
// chunks, slices are at most SLICE bytes and never straddle a chunk boundary (one piece
// each); with FastCDC, slices are SLICE bytes and a cut splits them into several pieces.
// Memory stays at a few slices whatever the file size: READS_IN_FLIGHT reads ahead, and at
// most FORWARD_WINDOW slices handed on but not yet hashed by the second worker.

import { FastCdc } from "./fastcdc.js";
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

function* plainSlices(size) {
  for (let start = 0; start < size; start += SLICE) {
    yield { start, end: Math.min(size, start + SLICE) };
  }
}

// Splits slices into pieces at the cut points FastCDC finds. The size is told to the
// cutter, so every end it returns is final and the chunk can be closed at once.
function cdcPieces(size, avgSize) {
  const cdc = new FastCdc({ avgSize, size });
  const ends = [];
  let chunkStart = 0;
  return {
    ends,
    split(s, buf) {
      const pieces = [];
      let start = s.start;
      for (const end of cdc.update(buf)) {
        pieces.push({ start, end, first: start === chunkStart, last: true });
        ends.push(end);
        chunkStart = start = end;
      }
      if (start < s.end) pieces.push({ start, end: s.end, first: start === chunkStart, last: false });
      return pieces;
    },
  };
}

const viewOf = (buf, sliceStart, p) => new Uint8Array(buf, p.start - sliceStart, p.end - p.start);

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
function chunkDigester(algo, stream = false) {
  const Hasher = hasherFor(algo);
  const native = algo === "sha256" && subtle !== undefined;
  const digests = [];
  let current = null;
  let chunkStart = 0;
  const done = (s, digest) => {
    digests.push(digest);
    if (stream) self.postMessage({ type: "chunk", offset: chunkStart, size: s.end - chunkStart, digest });
  };
  return {
    digests,
    async feed(s, buf) {
      if (s.first) chunkStart = s.start;
      if (native && s.first && s.last) {
        done(s, hexOf(await subtle.digest("SHA-256", buf)));
        return;
      }
      if (s.first) current = new Hasher();
      current.update(buf);
      if (s.last) done(s, current.hex());
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

async function readAndHash({ file, chunkSize, chunking = "fixed", algo, whole, chunks, forward, stream }) {
  const Hasher = hasherFor(algo);
  const fileHasher = whole ? new Hasher() : null;
  const chunker = chunks ? chunkDigester(algo, stream) : null;
  const takeCredit = forward ? acks(forward) : null;
  const cutter = chunking === "fastcdc" ? cdcPieces(file.size, chunkSize) : null;
  const plan = cutter ? plainSlices(file.size) : slices(file.size, chunkSize);
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
    const pieces = cutter ? cutter.split(s, buf) : null;
    if (chunker !== null) {
      if (pieces === null) await chunker.feed(s, buf);
      else for (const p of pieces) await chunker.feed(p, viewOf(buf, s.start, p));
    }
    if (forward) {
      await takeCredit();
      forward.postMessage({ s, buf, pieces }, [buf]);
    }
    self.postMessage({ type: "progress", bytes: s.end });
  }
  if (forward) forward.postMessage({ end: true });
  return {
    digest: fileHasher === null ? null : fileHasher.hex(),
    chunks: chunker === null ? null : chunker.digests,
    ends: cutter === null ? null : cutter.ends,
  };
}

function hashForwarded({ algo, source, stream }) {
  const chunker = chunkDigester(algo, stream);
  // Slices are fed strictly in order, even though feed() may await WebCrypto.
  let queue = Promise.resolve();
  return new Promise((resolve, reject) => {
    source.onmessage = ({ data }) => {
      queue = queue.then(async () => {
        if (data.end) {
          resolve({ digest: null, chunks: chunker.digests, ends: null });
          return;
        }
        if (data.pieces === null) await chunker.feed(data.s, data.buf);
        else for (const p of data.pieces) await chunker.feed(p, viewOf(data.buf, data.s.start, p));
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
