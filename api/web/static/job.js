/* The job page, live: follows /web/jobs/{id}/events (server-sent events) and updates the progress,
   the per-stage loss and accuracy curves (uPlot) and the event log without reloading; when the job
   ends it fetches the results (comparison, charts, artifacts) as a fragment. */
(function () {
  "use strict";
  var dataElement = document.getElementById("job-data");
  if (!dataElement) return;
  var job = JSON.parse(dataElement.textContent);
  var FINAL = { succeeded: true, failed: true, cancelled: true };
  var stageLabels = job.stage_labels || {};
  var colors = { train: "#4338ca", val: "#d97706" };

  function byId(id) { return document.getElementById(id); }

  function formatDuration(seconds) {
    if (seconds == null || !isFinite(seconds)) return "—";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    var minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min " + (seconds % 60) + " s";
    return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }

  function clock(iso) { return (iso || "").slice(11, 19); }

  // Curves ---------------------------------------------------------------------------------
  var stages = {}; // stage -> {epochs: [], train_loss: [], ..., loss: uPlot, accuracy: uPlot}

  function chartWidth(element) { return Math.max(240, element.clientWidth || 300); }

  function makeChart(element, title, unit, series) {
    var options = {
      width: chartWidth(element),
      height: 200,
      scales: { x: { time: false } },
      axes: [
        { label: "epoch", labelSize: 18, size: 36, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
          values: function (u, ticks) { return ticks.map(function (v) { return String(Math.round(v)); }); } },
        { size: 52, values: function (u, ticks) { return ticks.map(function (v) { return v == null ? "" : (unit === "%" ? v.toFixed(0) + "%" : v.toPrecision(3)); }); } },
      ],
      series: [{ label: "epoch" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, dash: s.dash, points: { show: true, size: 5 },
          value: function (u, v) { return v == null ? "—" : (unit === "%" ? v.toFixed(1) + "%" : v.toFixed(4)); } };
      })),
      legend: { live: true },
      // Off the chart, the legend shows the latest epoch's values rather than "--" and "—".
      hooks: { setCursor: [function (u) { if (u.cursor.idx == null) showLatest(u); }] },
    };
    var empty = [[]].concat(series.map(function () { return []; }));
    return new uPlot(options, empty, element);
  }

  function showLatest(u) {
    var count = u.data && u.data[0] ? u.data[0].length : 0;
    if (count > 0) u.setLegend({ idx: count - 1 }, false);
  }

  function stageBlock(stage) {
    if (stages[stage]) return stages[stage];
    var container = byId("curves");
    var label = stageLabels[stage] || stage;
    var section = document.createElement("section");
    section.className = "curve-stage";
    section.setAttribute("data-stage", stage);
    var heading = document.createElement("h3");
    heading.textContent = label;
    section.appendChild(heading);
    var pair = document.createElement("div");
    pair.className = "curve-pair";
    section.appendChild(pair);
    function figure(caption) {
      var fig = document.createElement("figure");
      fig.className = "curve";
      var cap = document.createElement("figcaption");
      cap.textContent = caption;
      var chart = document.createElement("div");
      chart.className = "chart";
      chart.setAttribute("role", "img");
      chart.setAttribute("aria-label", label + ": " + caption.toLowerCase() + " per epoch");
      fig.appendChild(cap);
      fig.appendChild(chart);
      pair.appendChild(fig);
      return chart;
    }
    var lossElement = figure("Loss");
    var accuracyElement = figure("Accuracy");
    container.appendChild(section);
    var block = {
      epochs: [], train_loss: [], val_loss: [], train_accuracy: [], val_accuracy: [],
      lossElement: lossElement, accuracyElement: accuracyElement,
    };
    block.loss = makeChart(lossElement, "Loss", "", [
      { label: "train", color: colors.train }, { label: "validation", color: colors.val, dash: [6, 4] },
    ]);
    block.accuracy = makeChart(accuracyElement, "Accuracy", "%", [
      { label: "train", color: colors.train }, { label: "validation", color: colors.val, dash: [6, 4] },
    ]);
    stages[stage] = block;
    byId("curves-empty").hidden = true;
    return block;
  }

  function percentOrNull(value) { return value == null ? null : value * 100; }

  function addPoint(point) {
    if (!point || !point.stage || typeof uPlot === "undefined") return;
    var block = stageBlock(point.stage);
    var index = block.epochs.indexOf(point.epoch);
    if (index === -1) {
      index = block.epochs.length;
      block.epochs.push(point.epoch);
    }
    ["train_loss", "val_loss"].forEach(function (key) { block[key][index] = point[key] == null ? null : point[key]; });
    ["train_accuracy", "val_accuracy"].forEach(function (key) { block[key][index] = percentOrNull(point[key]); });
    block.loss.setData([block.epochs, block.train_loss, block.val_loss]);
    block.accuracy.setData([block.epochs, block.train_accuracy, block.val_accuracy]);
    showLatest(block.loss);
    showLatest(block.accuracy);
    block.lossElement.setAttribute("data-points", String(block.epochs.length));
  }

  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      Object.keys(stages).forEach(function (stage) {
        var block = stages[stage];
        block.loss.setSize({ width: chartWidth(block.lossElement), height: 200 });
        block.accuracy.setSize({ width: chartWidth(block.accuracyElement), height: 200 });
      });
    }, 150);
  });

  // Progress, state and log ----------------------------------------------------------------
  function setProgress(progress, stageLabel) {
    // A stage's start comes without progress figures: its label must follow all the same.
    if (stageLabel && !FINAL[job.state]) byId("job-stage").textContent = stageLabel;
    if (!progress) return;
    var fraction = Math.min(1, Math.max(0, progress.fraction || 0));
    var bar = byId("job-progress");
    bar.value = fraction;
    bar.textContent = Math.round(fraction * 100) + "%";
    byId("job-percent").textContent = Math.floor(fraction * 100) + "%";
    byId("job-epoch").textContent = progress.epochs ? progress.epoch + " / " + progress.epochs : "—";
    byId("job-eta").textContent = formatDuration(progress.eta_s);
  }

  function setState(state) {
    var badge = byId("job-state");
    if (!badge) return;
    badge.className = "badge badge-large state-" + state;
    badge.textContent = state;
    badge.setAttribute("aria-label", "State: " + state);
    job.state = state;
  }

  function appendLog(line, at) {
    var list = byId("event-log");
    var item = document.createElement("li");
    item.className = "log-" + (line.level || "info");
    var time = document.createElement("time");
    time.setAttribute("datetime", at);
    time.textContent = clock(at);
    var text = document.createElement("span");
    text.textContent = line.text;
    item.appendChild(time);
    item.appendChild(document.createTextNode(" "));
    item.appendChild(text);
    var atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.appendChild(item);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  // Run time ticks while the job runs (the server's figure replaces it when the job ends).
  var startedAt = job.started_at ? Date.parse(job.started_at) : null;
  var runtimeTimer = null;
  function tickRuntime() {
    var element = byId("job-runtime");
    if (element && startedAt && !FINAL[job.state]) element.textContent = formatDuration((Date.now() - startedAt) / 1000);
  }
  function startRuntime(at) {
    if (!startedAt && at) startedAt = Date.parse(at);
    if (!runtimeTimer && startedAt) runtimeTimer = setInterval(tickRuntime, 1000);
    tickRuntime();
  }

  function loadResults() {
    var status = byId("live-status");
    if (typeof htmx === "undefined") { window.location.reload(); return; }
    htmx.ajax("GET", "/web/jobs/" + encodeURIComponent(job.id) + "/results", { target: "#job-results", swap: "outerHTML" })
      .then(function () { if (status) status.textContent = ""; });
  }

  function finish(state) {
    if (runtimeTimer) clearInterval(runtimeTimer);
    byId("job-eta").textContent = "—";
    if (state === "succeeded") {
      setProgress({ fraction: 1, epoch: 0, epochs: 0, eta_s: null }, "Done");
    }
    var status = byId("live-status");
    if (status) status.textContent = "The job " + state + "; loading the results…";
    loadResults();
  }

  function apply(message) {
    var data = message.data || {};
    if (message.kind === "progress") setProgress(data.progress, message.stage_label);
    if (message.line) appendLog(message.line, message.at);
    if (message.point) addPoint(message.point);
    if (message.kind === "cancel_requested") {
      var cancel = byId("cancel-job");
      if (cancel) { cancel.disabled = true; cancel.textContent = "Cancelling…"; }
    }
    if (message.kind === "state" && data.state) {
      setState(data.state);
      if (data.state === "queued") byId("job-stage").textContent = "Waiting for a worker";
      if (data.state === "running") startRuntime(message.at);
      if (data.state === "running" && data.attempt && byId("job-attempt")) {
        byId("job-attempt").textContent = byId("job-attempt").textContent.replace(/^\d+/, String(data.attempt));
      }
      if (FINAL[data.state]) return true;
    }
    return false;
  }

  // Start ----------------------------------------------------------------------------------
  (job.curves || []).forEach(addPoint);
  if (job.finished || FINAL[job.state]) return;

  if (job.state === "running") startRuntime(null);
  var lastId = job.last_event_id || 0;
  var source = new EventSource("/web/jobs/" + encodeURIComponent(job.id) + "/events?after=" + lastId);
  var kinds = ["state", "progress", "log", "resume", "cancel_requested"];
  kinds.forEach(function (kind) {
    source.addEventListener(kind, function (event) {
      var message;
      try { message = JSON.parse(event.data); } catch (error) { return; }
      if (apply(message)) {
        source.close();
        finish(message.data.state);
      }
    });
  });
  source.addEventListener("open", function () {
    var status = byId("live-status");
    if (status) status.textContent = "Following live…";
  });
  source.addEventListener("error", function () {
    var status = byId("live-status");
    if (source.readyState === EventSource.CLOSED) {
      if (status) status.textContent = "Live updates stopped; reload the page to resume them.";
    } else if (status) {
      status.textContent = "Reconnecting…";
    }
  });
})();
