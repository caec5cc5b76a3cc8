// nex JavaScript function: the script's completion value is the function nex calls with the
// trigger subject and the payload (a Uint8Array). The reply is JSON.stringify(result).
(function (subject, payload) {
  return { triggered_on: subject, payload: String.fromCharCode(...payload) };
})
