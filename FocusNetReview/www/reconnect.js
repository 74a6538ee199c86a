// FocusNet review: when the connection to the server is lost (a restart, a
// crash), trame shows "Connection closed". Ask the server every 2 s whether it
// is back and reload the page when it is: the review resumes from its
// checkpoint on the server, so the reviewer only waits.
(function () {
  var reloading = false;
  setInterval(function () {
    if (reloading || !document.body) return;
    if (!/Connection (closed|error)/.test(document.body.innerText)) return;
    fetch(window.location.pathname, { cache: "no-store" }).then(function (answer) {
      if (answer.ok && !reloading) {
        reloading = true;
        window.location.reload();
      }
    }).catch(function () { /* still down: try again */ });
  }, 2000);
})();
