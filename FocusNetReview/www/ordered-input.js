// FocusNet review: the reviewer's input reaches the server in the order it
// was made, and the page says when the server is behind.
//
// A trame page sends input three ways, and they do not keep their order
// when the server is slow: a view's mouse events (trame-rca) wait in the
// view's own queue, each answered before the next is sent; a button press
// (trame.trigger) is sent at once; a changed state value waits until no call
// is pending. So a paint stroke followed by "Click to place" reached the
// server after the button (the stroke became a placement), and a click to
// find followed by the paint tool was painted.
//
// All of it leaves through the page's one WebSocket, so that is where order
// is kept (wslink's session object is frozen). A button press or state
// change is held until the view events the reviewer made before it have
// been sent and answered: no press in a view is still waiting in a view's
// queue (presses are timed as they happen, in the page) and none sent is
// unanswered. A stroke or click begun after a held button press waits
// behind it. A view event first sends any state change the page made before
// it. While input waits, or the server has not answered it for a moment, a
// banner says so (#fn-busy).
(function () {
  var VIEW_QUIET_MS = 150;  // a view's queue sends its next event within this of an answer
  var BUSY_AFTER_MS = 1000;  // input unanswered this long: the server is behind, say so (a render takes 0.3 s)
  var METHODS = ["trame.rca.event", "trame.trigger", "trame.state.update"];
  var send = WebSocket.prototype.send;
  var held = [];  // [socket, data, info] in the order the page sent them
  var unanswered = new Map();  // message id -> when the reviewer made it (input only)
  var views = new Set();  // ids of view events sent and not yet answered
  var lastView = 0;
  var bypass = false;
  var presses = [];  // when each press in a view happened, not yet sent by the view's queue
  var stroke = 0;  // when the press of the view events now being sent happened
  var log = window.__focusnetInput = [];  // the last input messages: [ms, what, method, id] (for diagnosis)

  function note(what, info) {
    log.push([Date.now(), what, info.method, info.id]);
    if (log.length > 300) log.shift();
  }

  function text(bytes, limit) {
    var view = new Uint8Array(bytes, 0, Math.min(limit, bytes.byteLength));
    var out = "";
    for (var i = 0; i < view.length; i++) out += String.fromCharCode(view[i]);
    return out;
  }

  function describe(data) {
    // wslink sends msgpack chunks: a 12-byte header, then {wslink, id, method, ...};
    // strings are stored as they are, after a length byte.
    var bytes = data instanceof ArrayBuffer ? data : (ArrayBuffer.isView(data) ? data.buffer.slice(
      data.byteOffset, data.byteOffset + data.byteLength) : null);
    if (!bytes) return { method: "", id: "" };
    var head = text(bytes, 512);
    var method = "";
    METHODS.forEach(function (m) { if (head.indexOf(m) >= 0) method = m; });
    var at = head.indexOf("rpc:");
    var id = "";
    if (at > 1 && head.charCodeAt(at - 2) === 0xd9) {  // msgpack str 8: 0xd9, length
      id = head.substr(at, head.charCodeAt(at - 1));
    } else if (at > 0 && head.charCodeAt(at - 1) >= 0xa0 && head.charCodeAt(at - 1) < 0xc0) {  // fixstr
      id = head.substr(at, head.charCodeAt(at - 1) - 0xa0);
    }
    return { method: method, id: id, press: method === "trame.rca.event" && head.indexOf("ButtonPress") >= 0 };
  }

  function packed(id) {  // the id as msgpack writes it, so that "rpc:x:1" does not match "rpc:x:12"
    return (id.length < 32 ? String.fromCharCode(0xa0 + id.length) : "\xd9" + String.fromCharCode(id.length)) + id;
  }

  function listen(socket) {
    if (socket.__focusnetListening) return;
    socket.__focusnetListening = true;
    socket.addEventListener("message", function (event) {
      if (!unanswered.size) return;
      var data = event.data;
      var read = data instanceof Blob ? data.slice(0, 512).arrayBuffer() : Promise.resolve(data);
      read.then(function (bytes) {
        if (!(bytes instanceof ArrayBuffer)) return;
        var head = text(bytes, 512);
        unanswered.forEach(function (_, id) {
          if (head.indexOf(packed(id)) >= 0) {
            unanswered.delete(id);
            note("answered", { method: views.has(id) ? "trame.rca.event" : "", id: id });
            if (views.delete(id)) lastView = Date.now();
          }
        });
        drain();
      });
    });
  }

  function plain(value) {
    if (value === null || ["string", "number", "boolean"].indexOf(typeof value) >= 0) return true;
    if (Array.isArray(value)) return value.every(plain);
    if (typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
      return Object.keys(value).every(function (k) { return plain(value[k]); });
    }
    return false;
  }

  function flushStateFirst() {
    // A state change the page made before this view event (trame holds it while a call is pending).
    var trame = window.trame;
    var state = trame && trame.state;
    if (!state || !state.dirtyKeys || !state.dirtyKeys.size) return;
    var changes = [];
    Array.from(state.dirtyKeys).forEach(function (key) {
      if (plain(state.state[key])) {
        changes.push({ key: key, value: state.state[key] });
        state.dirtyKeys.delete(key);
      }
    });
    if (!changes.length) return;
    bypass = true;
    try { trame.client.getRemote().Trame.updateState(changes); } finally { bypass = false; }
  }

  function forward(socket, data, info) {
    if (info.method === "trame.rca.event") {
      flushStateFirst();
      views.add(info.id);
      lastView = Date.now();
    }
    if (info.method && info.id && !unanswered.has(info.id)) unanswered.set(info.id, info.made || Date.now());
    if (info.method) note("sent", info);
    return send.call(socket, data);
  }

  function pressesBefore(made) {
    var stale = Date.now() - 60000;  // a press the view never sent (none seen so far) holds nothing for ever
    presses = presses.filter(function (t) { return t > stale; });
    return presses.some(function (t) { return t <= made; });
  }

  function ready(info) {  // a button press or state change: the views have sent and heard back what came before
    return views.size === 0 && Date.now() - lastView >= VIEW_QUIET_MS && !pressesBefore(info.made);
  }

  function isView(info) { return info.method === "trame.rca.event"; }

  function drain() {
    while (held.length) {
      var next = held[0];
      if (!isView(next[2]) && !ready(next[2])) {
        setTimeout(drain, 20);
        return;
      }
      held.shift();
      forward(next[0], next[1], next[2]);
    }
  }

  function mustWait(info) {
    if (isView(info)) {  // behind a held button press made before this stroke began, or a held view event
      return held.some(function (h) { return isView(h[2]) || h[2].made < info.stroke; });
    }
    return held.length > 0 || !ready(info);
  }

  document.addEventListener("pointerdown", function (event) {
    if (event.target && event.target.closest && event.target.closest(".remote-controlled-area")) {
      presses.push(Date.now());
    }
  }, true);

  WebSocket.prototype.send = function (data) {
    listen(this);
    var info = describe(data);
    info.made = Date.now();
    if (!info.method) return send.call(this, data);
    if (bypass) return forward(this, data, info);
    if (isView(info)) {
      if (info.press) stroke = presses.length ? presses.shift() : info.made;
      info.stroke = stroke;
    }
    if (!mustWait(info)) return forward(this, data, info);
    held.push([this, data, info]);
    note("held", info);
    setTimeout(drain, 20);
  };

  function banner() {
    var element = document.getElementById("fn-busy");
    if (!element && document.body) {
      element = document.createElement("div");
      element.id = "fn-busy";
      element.setAttribute("role", "status");
      element.style.cssText = "position: fixed; top: 8px; left: 50%; transform: translateX(-50%); z-index: 3000;" +
        "background: #fff3cd; color: #664d03; border: 1px solid #ffe69c; border-radius: 6px;" +
        "padding: 4px 12px; font: 13px sans-serif; display: none; pointer-events: none;";
      document.body.appendChild(element);
    }
    return element;
  }

  setInterval(function () {
    var element = banner();
    if (!element) return;
    var now = Date.now();
    var waiting = held.filter(function (h) { return h[2].method; }).length;
    var late = waiting;
    unanswered.forEach(function (made) { if (now - made >= BUSY_AFTER_MS) late += 1; });
    if (late) {
      element.textContent = "Server busy: " + (waiting + unanswered.size) +
        " input(s) on their way; they are applied in order.";
      element.style.display = "block";
    } else {
      element.style.display = "none";
    }
  }, 100);
})();
