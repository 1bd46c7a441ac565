// Loaded with `node --import` before a program that takes no HTTP headers of its own (the MCP
// conformance suite): every request it makes with fetch carries TOLLGATE_AUTHORIZATION, as an
// agent's requests carry its key.
const authorization = process.env.TOLLGATE_AUTHORIZATION;
const fetch = globalThis.fetch;
globalThis.fetch = (input, init = {}) => {
  const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
  if (authorization) headers.set("authorization", authorization);
  return fetch(input, { ...init, headers });
};
