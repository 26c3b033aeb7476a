// The billing run page: polls the run's progress (the workflow's progress query, as JSON) and moves
// the bar, the counters and the failures table until the run is done. No framework.
(function () {
  var run = document.getElementById("run");
  if (!run) { return; }
  var url = run.dataset.progressUrl;
  var bar = document.getElementById("run-progress");
  var shown = document.getElementById("run-percent");
  var state = document.getElementById("run-status");
  var waiting = document.getElementById("no-answer");
  var failures = document.querySelector("#failures tbody");
  var none = document.getElementById("no-failures");

  function cell(row, label, text, link) {
    var td = document.createElement("td");
    td.dataset.label = label;
    if (link) {
      var a = document.createElement("a");
      a.href = link; a.target = "_blank"; a.rel = "noopener"; a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    row.appendChild(td);
  }

  function show(p) {
    bar.value = p.percent;
    bar.textContent = p.percent + "%";
    shown.textContent = p.percent + "%";
    state.textContent = p.status;
    if (waiting && p.answered) { waiting.hidden = true; }
    ["periods_found", "invoices_created", "invoices_existing", "failed"].forEach(function (key) {
      var el = document.querySelector('#run-counts [data-count="' + key + '"]');
      if (el) { el.textContent = String(p[key]); }
    });
    failures.replaceChildren();
    p.failures.forEach(function (f) {
      var row = document.createElement("tr");
      cell(row, "Subscription", f.subscription_id);
      cell(row, "Boundary", f.period_start);
      cell(row, "Error", f.error_type);
      cell(row, "Message", f.message);
      cell(row, "Workflow", f.workflow_id, f.link);
      failures.appendChild(row);
    });
    none.hidden = p.failures.length > 0;
    run.dataset.done = p.done ? "true" : "false";
  }

  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(new Error("progress: " + r.status)); })
      .then(function (p) { show(p); if (!p.done) { window.setTimeout(poll, 1000); } })
      .catch(function () { window.setTimeout(poll, 3000); });
  }
  poll();
})();
