/* The comparison page: each stage's validation curves of every job on one chart (uPlot, as the job page). */
(function () {
  "use strict";
  var dataElement = document.getElementById("compare-data");
  var container = document.getElementById("curves");
  if (!dataElement || !container || typeof uPlot === "undefined") return;
  var data = JSON.parse(dataElement.textContent);
  var palette = ["#4338ca", "#d97706", "#059669", "#db2777", "#0891b2", "#7c3aed", "#65a30d", "#dc2626"];
  var charts = [];

  function showLatest(u) {
    var count = u.data && u.data[0] ? u.data[0].length : 0;
    if (count > 0) u.setLegend({ idx: count - 1 }, false);
  }

  function width(element) { return Math.max(240, element.clientWidth || 300); }

  var byStage = {};
  data.charts.forEach(function (chart) {
    var section = byStage[chart.stage];
    if (!section) {
      section = document.createElement("section");
      section.className = "curve-stage";
      section.setAttribute("data-stage", chart.stage);
      var heading = document.createElement("h3");
      heading.textContent = data.stage_labels[chart.stage] || chart.stage;
      section.appendChild(heading);
      var pair = document.createElement("div");
      pair.className = "curve-pair";
      section.appendChild(pair);
      container.appendChild(section);
      byStage[chart.stage] = section;
    }
    var figure = document.createElement("figure");
    figure.className = "curve";
    var caption = document.createElement("figcaption");
    caption.textContent = chart.title;
    var element = document.createElement("div");
    element.className = "chart";
    element.setAttribute("role", "img");
    element.setAttribute("aria-label", (data.stage_labels[chart.stage] || chart.stage) + ": " + chart.title.toLowerCase() +
                         " per epoch of " + chart.labels.join(", "));
    element.setAttribute("data-series", String(chart.series.length));
    figure.appendChild(caption);
    figure.appendChild(element);
    section.querySelector(".curve-pair").appendChild(figure);
    var percent = chart.unit === "%";
    var options = {
      width: width(element),
      height: 220,
      // Accuracy stays on 0-100% (uPlot would stretch a flat 100% line up to 200%).
      scales: { x: { time: false }, y: percent ? { range: [0, 100] } : {} },
      axes: [
        { label: "epoch", labelSize: 18, size: 36, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
          values: function (u, ticks) { return ticks.map(function (v) { return String(Math.round(v)); }); } },
        { size: 64, values: function (u, ticks) { return ticks.map(function (v) { return v == null ? "" : (percent ? v.toFixed(0) + "%" : String(Number(v.toPrecision(3)))); }); } },
      ],
      series: [{ label: "epoch" }].concat(chart.labels.map(function (label, index) {
        return { label: label, stroke: palette[index % palette.length], width: 2, spanGaps: true,
          dash: index % 2 ? [6, 4] : undefined, points: { show: true, size: 5 },
          value: function (u, v) { return v == null ? "—" : (percent ? v.toFixed(1) + "%" : v.toFixed(4)); } };
      })),
      legend: { live: true },
      hooks: { setCursor: [function (u) { if (u.cursor.idx == null) showLatest(u); }] },
    };
    var plot = new uPlot(options, [chart.epochs].concat(chart.series), element);
    showLatest(plot);
    charts.push({ plot: plot, element: element });
  });

  var timer = null;
  window.addEventListener("resize", function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      charts.forEach(function (chart) { chart.plot.setSize({ width: width(chart.element), height: 220 }); });
    }, 150);
  });
})();
