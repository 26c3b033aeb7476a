// While a payment is in progress the invoice page reloads itself every few seconds (no framework).
(function () {
  var seconds = Number(document.currentScript.dataset.seconds || "3");
  window.setTimeout(function () { window.location.reload(); }, seconds * 1000);
})();
