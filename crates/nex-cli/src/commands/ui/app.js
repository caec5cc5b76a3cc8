// nex ui: refreshes the node and workload tables and appends live events and log lines.
// Every value from NATS is written with textContent (the tables come escaped by the server).
(function () {
  'use strict';

  var overview = document.getElementById('overview');
  var feed = document.getElementById('feed');
  var status = document.getElementById('feed-status');
  var pause = document.getElementById('pause');
  var MAX_LINES = 500;
  var paused = false;

  function refresh() {
    fetch(overview.getAttribute('data-src'), { cache: 'no-store' })
      .then(function (r) {
        if (!r.ok) { throw new Error('HTTP ' + r.status); }
        return r.text();
      })
      .then(function (html) {
        overview.innerHTML = html;
        overview.classList.remove('stale');
      })
      .catch(function () { overview.classList.add('stale'); });
  }
  setInterval(refresh, 2000);

  function cell(cls, text) {
    var span = document.createElement('span');
    span.className = cls;
    span.textContent = text;
    return span;
  }

  function append(item) {
    var li = document.createElement('li');
    li.className = item.kind + ' level-' + String(item.level).toLowerCase().replace(/[^a-z]/g, '');
    li.appendChild(cell('time', item.time));
    li.appendChild(cell('level', item.level));
    li.appendChild(cell('who', item.workload ? item.namespace + '/' + item.workload : item.namespace));
    li.appendChild(cell('node', item.node.slice(0, 8)));
    li.appendChild(cell('text', item.text));
    li.title = item.node + (item.workload_id ? ' ' + item.workload_id : '');
    feed.insertBefore(li, feed.firstChild);
    while (feed.childNodes.length > MAX_LINES) { feed.removeChild(feed.lastChild); }
  }

  var es = new EventSource(feed.getAttribute('data-src'));
  es.onopen = function () { status.textContent = 'live'; status.className = 'live'; };
  es.onerror = function () { status.textContent = 'reconnecting…'; status.className = 'down'; };
  es.onmessage = function (m) {
    if (paused) { return; }
    try { append(JSON.parse(m.data)); } catch (e) { /* not ours */ }
  };

  if (pause) {
    pause.addEventListener('click', function () {
      paused = !paused;
      pause.textContent = paused ? 'Resume' : 'Pause';
    });
  }
})();
