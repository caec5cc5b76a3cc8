// HTTP host service: every verb against the URL given as the payload.
(function (subject, payload) {
  const url = String.fromCharCode(...payload);
  const body = Uint8Array.from('hello', (c) => c.charCodeAt(0));
  const out = {};
  const call = (name, f) => {
    try {
      const r = f();
      out[name] = { status: r.status, headers: r.headers, length: r.response ? r.response.length : 0, body: r.response };
    } catch (e) {
      out[name + 'Ex'] = e;
    }
  };
  call('get', () => hostServices.http.get(url));
  call('post', () => hostServices.http.post(url, body));
  call('put', () => hostServices.http.put(url, body));
  call('patch', () => hostServices.http.patch(url, body));
  call('delete', () => hostServices.http.delete(url));
  call('head', () => hostServices.http.head(url));
  return out;
})
