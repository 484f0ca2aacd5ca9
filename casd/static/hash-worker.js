// Hashes a File off the main thread: casd.js starts this as a module Worker.
//
// Message in:  {file, chunkSize, algo: "md5"|"sha256", whole: bool, chunks: bool}
// Messages out: {type: "progress", bytes}  bytes of the file hashed so far
//               {type: "done", digest, chunks}  whole-file digest (or null), chunk digests
//                                               in file order (or null)
//               {type: "error", message}
//
// The file is read by slices of at most SLICE bytes that never straddle a chunk boundary,
// with the next slice's read in flight while the current one is hashed: memory stays at
// two slices whatever the file size, and the disk and the CPU work at the same time.

import { Md5 } from "./md5.js";
import { Sha256 } from "./sha256.js";

const SLICE = 8 * 1024 * 1024;

function* slices(size, chunkSize) {
  for (let chunkStart = 0; chunkStart < size; chunkStart += chunkSize) {
    const chunkEnd = Math.min(size, chunkStart + chunkSize);
    for (let start = chunkStart; start < chunkEnd; start += SLICE) {
      const end = Math.min(chunkEnd, start + SLICE);
      yield { start, end, first: start === chunkStart, last: end === chunkEnd };
    }
  }
}

async function hash({ file, chunkSize, algo, whole, chunks }) {
  const Hasher = algo === "sha256" ? Sha256 : Md5;
  const fileHasher = whole ? new Hasher() : null;
  const digests = chunks ? [] : null;
  let chunkHasher = null;
  const plan = slices(file.size, chunkSize);
  const read = (s) => file.slice(s.start, s.end).arrayBuffer().then((buf) => ({ s, buf }));
  let step = plan.next();
  let pending = step.done ? null : read(step.value);
  while (pending !== null) {
    const { s, buf } = await pending;
    step = plan.next();
    pending = step.done ? null : read(step.value);
    if (buf.byteLength !== s.end - s.start) {
      throw new Error(`the file changed while it was read (${file.name || "blob"})`);
    }
    if (fileHasher !== null) fileHasher.update(buf);
    if (digests !== null) {
      if (s.first) chunkHasher = new Hasher();
      chunkHasher.update(buf);
      if (s.last) digests.push(chunkHasher.hex());
    }
    self.postMessage({ type: "progress", bytes: s.end });
  }
  return { digest: fileHasher === null ? null : fileHasher.hex(), chunks: digests };
}

self.onmessage = async (event) => {
  try {
    const result = await hash(event.data);
    self.postMessage({ type: "done", ...result });
  } catch (err) {
    self.postMessage({ type: "error", message: String((err && err.message) || err) });
  }
};
