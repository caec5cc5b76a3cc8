// Key/value host service: set, delete, set again, list the keys and read one back.
(function (subject, payload) {
  const kv = hostServices.kv;
  const bytes = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
  kv.set('hello', bytes('world'));
  kv.delete('hello');
  kv.set('hello2', payload);
  return { keys: kv.keys(), hello2: String.fromCharCode(...kv.get('hello2')) };
})
