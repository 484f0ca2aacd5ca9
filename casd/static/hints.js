// What the upload page tells a person after a failed upload, by the error's code: most
// failures are retried by picking the file again, but a token that is wrong, a role that
// may not upload or a full quota fail the same way until someone changes something.

const HINTS = {
  unauthorized: "check the token: the server does not know it (or needs one)",
  forbidden: "this token may not do that: ask for a token with the upload role",
  quota_exceeded: "your quota is full: delete some of your files, then pick the file again",
};

/** The line shown under a failed upload for an error code. */
export function failureHint(code) {
  return HINTS[code] ?? "pick the file again to retry; the chunks already sent are kept";
}
