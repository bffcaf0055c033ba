/* Distillery pages: small progressive enhancements. No inline scripts (the CSP forbids them). */
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrfToken = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function formatSize(bytes) {
    var units = ["B", "kB", "MB", "GB"];
    var size = bytes;
    for (var i = 0; i < units.length; i++) {
      if (size < 1000 || i === units.length - 1) {
        return i === 0 ? size + " B" : size.toFixed(1) + " " + units[i];
      }
      size /= 1000;
    }
    return bytes + " B";
  }

  function fileLabel(file) {
    var info = file.info || {};
    var parts = [file.name, formatSize(file.size)];
    if (file.purpose === "dataset" && info.format === "txt") {
      parts.push("text, " + info.num_rows + " lines");
    } else if (file.purpose === "dataset" && info.kind === "text") {
      parts.push(info.num_rows + " rows, columns " + (info.columns || []).join(", "));
    } else if (file.purpose === "dataset" && info.num_train != null) {
      var shape = (info.sample_shape || []).join("×");
      var test = info.num_test ? " / " + info.num_test + " test" : "";
      var classes = info.num_classes ? ", " + info.num_classes + " classes" : "";
      parts.push(info.num_train + " train" + test + ", " + shape + classes);
    } else if (file.purpose === "teacher" && info.hf) {
      parts.push("hf " + info.hf.model_type + ", " + info.hf.num_layers + " layers" +
                 (info.hf.task === "causal_lm" ? ", causal LM" :
                  info.hf.labels ? ", labels " + info.hf.labels.join("/") : ", no head"));
    } else if (file.purpose === "teacher" && info.format) {
      parts.push(info.format + (info.output_size ? ", " + info.output_size + " outputs" : ""));
    }
    return parts.join(" · ");
  }

  // "created 3 min ago" stays true while the page is open: every <time data-ago> counts on, from the
  // server's clock (the page says what time it was there), so a skewed laptop clock changes nothing.
  var serverTime = document.querySelector('meta[name="server-time"]');
  var skew = serverTime ? (Date.parse(serverTime.getAttribute("content")) - Date.now()) || 0 : 0;
  function ago(milliseconds) {
    var seconds = Math.max(0, Math.floor(milliseconds / 1000));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }
  function refreshTimes() {
    var now = Date.now() + skew;
    document.querySelectorAll("time[data-ago]").forEach(function (element) {
      var at = Date.parse(element.getAttribute("datetime"));
      if (!isNaN(at)) element.textContent = ago(now - at);
    });
  }
  if (document.querySelector("time[data-ago]") || document.getElementById("jobs-table")) setInterval(refreshTimes, 1000);

  // Jobs list: Compare is ready once two jobs are ticked (the boxes survive the list's refreshes).
  var compareForm = document.getElementById("compare-form");
  if (compareForm) {
    var compareButton = document.getElementById("compare-jobs");
    var compareHint = document.getElementById("compare-hint");
    var updateCompare = function () {
      var ticked = document.querySelectorAll('input[form="compare-form"]:checked').length;
      compareButton.disabled = ticked < 2;
      compareHint.textContent = ticked < 2 ? "Tick two or more jobs to compare them." : ticked + " jobs ticked.";
    };
    document.addEventListener("change", function (event) {
      if (event.target && event.target.getAttribute && event.target.getAttribute("form") === "compare-form") updateCompare();
    });
    updateCompare();
  }

  // Jobs list: the state filter applies as soon as it changes.
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () {
      if (select.form) select.form.requestSubmit();
    });
  });

  // New job: show the arguments of the chosen architecture.
  function showArchArgs(select) {
    var owner = select.getAttribute("data-arch-owner");
    document.querySelectorAll('.arch-args[data-owner="' + owner + '"]').forEach(function (block) {
      block.hidden = block.getAttribute("data-arch") !== select.value;
    });
  }
  document.querySelectorAll("select[data-arch-owner]").forEach(function (select) {
    select.addEventListener("change", function () { showArchArgs(select); });
    showArchArgs(select);
  });

  // New job: uploads go to /web/files with a progress bar, then the new file is selected.
  var uploadsRunning = 0;
  function setStatus(element, text, kind) {
    element.textContent = text;
    element.classList.toggle("is-error", kind === "error");
    element.classList.toggle("is-done", kind === "done");
  }

  function addChoice(file, targetSelect) {
    var label = fileLabel(file);
    var info = file.info || {};
    document.querySelectorAll('select[data-purpose="' + file.purpose + '"]').forEach(function (select) {
      // The same bytes again replace their earlier choice instead of listing it twice.
      var wasChosen = false;
      Array.prototype.slice.call(select.options).forEach(function (old) {
        if (file.sha256 && old.getAttribute("data-sha256") === file.sha256) {
          wasChosen = wasChosen || old.selected;
          old.remove();
        }
      });
      var option = document.createElement("option");
      option.value = file.id;
      option.setAttribute("data-sha256", file.sha256 || "");
      option.textContent = label;
      if (info.format) option.setAttribute("data-format", info.format);
      if (info.hf) option.setAttribute("data-task", info.hf.task);
      if (info.columns) option.setAttribute("data-columns", JSON.stringify(info.columns));
      select.insertBefore(option, select.options[1] || null);
      if (wasChosen) select.value = file.id;
    });
    targetSelect.value = file.id;
    targetSelect.dispatchEvent(new Event("change", { bubbles: true }));
  }

  document.querySelectorAll("input[type=file][data-upload-for]").forEach(function (input) {
    input.addEventListener("change", function () {
      var file = input.files && input.files[0];
      if (!file) return;
      var baseId = input.getAttribute("data-upload-for");
      var select = document.getElementById(baseId);
      var progress = document.getElementById(baseId + "-progress");
      var status = document.getElementById(baseId + "-status");
      var submit = document.getElementById("submit-job");
      var body = new FormData();
      body.append("purpose", input.getAttribute("data-purpose"));
      body.append("file", file, file.name);

      var request = new XMLHttpRequest();
      request.open("POST", "/web/files");
      request.setRequestHeader("X-CSRF-Token", csrfToken);
      request.setRequestHeader("Accept", "application/json");
      request.upload.addEventListener("progress", function (event) {
        if (event.lengthComputable) {
          progress.value = event.loaded / event.total;
          setStatus(status, "Uploading " + file.name + ": " + Math.round((100 * event.loaded) / event.total) + "%");
        }
      });
      request.addEventListener("load", function () {
        uploadsRunning -= 1;
        if (submit && uploadsRunning === 0) submit.disabled = false;
        var answer = null;
        try { answer = JSON.parse(request.responseText); } catch (error) { answer = null; }
        if (request.status === 201 && answer) {
          progress.value = 1;
          addChoice(answer, select);
          setStatus(status, "Uploaded and checked: " + fileLabel(answer), "done");
        } else {
          progress.hidden = true;
          var message = answer && answer.error ? answer.error.message : "the upload failed (HTTP " + request.status + ")";
          setStatus(status, "Not uploaded: " + message, "error");
        }
        input.value = "";
      });
      request.addEventListener("error", function () {
        uploadsRunning -= 1;
        if (submit && uploadsRunning === 0) submit.disabled = false;
        progress.hidden = true;
        setStatus(status, "Not uploaded: the connection failed; try again.", "error");
      });
      uploadsRunning += 1;
      if (submit) submit.disabled = true;
      progress.hidden = false;
      progress.value = 0;
      setStatus(status, "Uploading " + file.name + "…");
      request.send(body);
    });
  });

  // New job: the spec as YAML and curl, refreshed while the view is open.
  var specView = document.getElementById("spec-view");
  var jobForm = document.getElementById("job-form");
  if (specView && jobForm) {
    var target = document.getElementById("spec-preview");
    var pending = null;
    var refresh = function () {
      if (!specView.open) return;
      fetch(specView.getAttribute("data-preview-url"), {
        method: "POST",
        body: new FormData(jobForm),
        headers: { "X-CSRF-Token": csrfToken },
        credentials: "same-origin",
      })
        .then(function (response) { return response.text().then(function (text) { return [response.ok, text]; }); })
        .then(function (result) {
          if (result[0]) target.innerHTML = result[1];
          else target.textContent = "The preview is not available right now.";
        })
        .catch(function () { target.textContent = "The preview is not available right now."; });
    };
    specView.addEventListener("toggle", refresh);
    jobForm.addEventListener("input", function () {
      if (pending) clearTimeout(pending);
      pending = setTimeout(refresh, 400);
    });
    jobForm.addEventListener("change", function () {
      if (pending) clearTimeout(pending);
      pending = setTimeout(refresh, 150);
    });
  }

  if (jobForm) {
    jobForm.addEventListener("submit", function (event) {
      if (uploadsRunning > 0) {
        event.preventDefault();
      }
    });
    var summary = document.getElementById("form-errors");
    if (summary) summary.focus();
  }

  // Copy buttons (in fragments too, hence the delegation).
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) return;
    var text = source.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
    } else {
      selectText(source);
    }
  });

  function selectText(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
})();

/* New job: the form follows the teacher's task. A Hugging Face teacher (format hf) makes a text job:
   the text-only fields appear, the image-only ones hide, and fields still at their image default take
   the text default (the same values the server fills in for a text job left at its defaults). */
(function () {
  "use strict";
  var form = document.getElementById("job-form");
  var teacher = document.getElementById("f-teacher-file");
  if (!form || !teacher) return;
  var task = document.getElementById("f-task");
  var train = document.getElementById("f-data-train");
  var columns = document.getElementById("dataset-columns");

  function fieldValue(block) {
    var inputs = block.querySelectorAll("input, select, textarea");
    if (block.classList.contains("field-checks")) {
      return Array.prototype.filter.call(inputs, function (i) { return i.checked; }).map(function (i) { return i.value; });
    }
    var input = inputs[0];
    if (!input) return null;
    return input.type === "checkbox" ? input.checked : input.value;
  }

  function setFieldValue(block, value) {
    var inputs = block.querySelectorAll("input, select, textarea");
    if (block.classList.contains("field-checks")) {
      inputs.forEach(function (i) { i.checked = value.indexOf(i.value) >= 0; });
      return;
    }
    var input = inputs[0];
    if (!input) return;
    if (input.type === "checkbox") input.checked = !!value; else input.value = value;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  }

  function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

  function currentTask() {
    var option = teacher.options[teacher.selectedIndex];
    if (option && option.getAttribute("data-format") === "hf") {
      return option.getAttribute("data-task") || "text_classification";
    }
    if (task && task.value && task.value !== "auto") return task.value;
    return "image_classification";
  }

  // `data-only` lists the tasks a field belongs to, space-separated.
  function showOnly(chosen) {
    form.querySelectorAll("[data-only]").forEach(function (block) {
      block.hidden = block.getAttribute("data-only").split(" ").indexOf(chosen) < 0;
    });
  }

  var shown = null;
  function applyTask() {
    var chosen = currentTask();
    if (task && chosen !== "image_classification" && task.value === "image_classification") task.value = "auto";
    showOnly(chosen);
    if (shown !== null && shown !== chosen) {
      // A value still at the old task's default moves to the new task's; one the user typed stays.
      form.querySelectorAll("[data-defaults]").forEach(function (block) {
        var defaults = JSON.parse(block.getAttribute("data-defaults"));
        if (same(fieldValue(block), defaults[shown])) setFieldValue(block, defaults[chosen]);
      });
    }
    shown = chosen;
  }

  function listColumns() {
    if (!columns || !train) return;
    var option = train.options[train.selectedIndex];
    var names = option ? JSON.parse(option.getAttribute("data-columns") || "[]") : [];
    columns.innerHTML = "";
    names.forEach(function (name) {
      var item = document.createElement("option");
      item.value = name;
      columns.appendChild(item);
    });
  }

  // The first rendering already holds the values the server chose (a resubmitted text job keeps its own).
  shown = currentTask();
  showOnly(shown);
  teacher.addEventListener("change", applyTask);
  if (task) task.addEventListener("change", applyTask);
  if (train) train.addEventListener("change", listColumns);
  listColumns();
})();
