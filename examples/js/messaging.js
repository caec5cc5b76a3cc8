// Messaging host service: publish on hello.world, then ask hello.world.request and return the answer.
(function (subject, payload) {
  const out = {};
  hostServices.messaging.publish('hello.world', payload);
  try {
    out['hello.world.request'] = String.fromCharCode(...hostServices.messaging.request('hello.world.request', payload));
  } catch (e) {
    out['hello.world.request.ex'] = e;
  }
  return out;
})
