// Object store host service: put, delete, put again, list and read back.
(function (subject, payload) {
  const os = hostServices.objectStore;
  const bytes = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
  os.put('hello', bytes('world'));
  os.delete('hello');
  os.put('hello2', payload);
  return { list: os.list(), hello2: String.fromCharCode(...os.get('hello2')) };
})
