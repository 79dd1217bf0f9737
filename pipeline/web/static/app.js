// The pipeline web UI: live diagram on the main page, live log on job pages.
// Loaded as a file (the Content-Security-Policy forbids inline scripts).
"use strict";

function setState(element, state) {
  element.textContent = state;
  element.className = "state state-" + state;
}

// Main page: redraw the diagram when the server says the pipeline changed.
function followPipeline(diagram) {
  let shown = Number(diagram.dataset.revision);
  let wanted = shown;
  let fetching = false;

  async function redraw() {
    if (fetching) return;  // the loop below picks up the newest revision when done
    fetching = true;
    try {
      while (shown !== wanted) {
        const target = wanted;
        const response = await fetch("/pipeline.svg" + window.location.search);
        if (!response.ok) break;
        const svg = await response.text();
        diagram.innerHTML = svg.slice(svg.indexOf("<svg"));
        if (response.headers.get("X-Diagram") === "stale") {
          // The server is still drawing the newest diagram: ask again shortly.
          await new Promise((resolve) => setTimeout(resolve, 250));
          continue;
        }
        shown = target;
        diagram.dataset.revision = String(shown);
      }
    } finally {
      fetching = false;
    }
  }

  const events = new EventSource("/events");
  events.addEventListener("changed", (event) => {
    const info = JSON.parse(event.data);
    setState(document.getElementById("overall-state"), info.state);
    for (const [state, count] of Object.entries(info.counts)) {
      const item = document.querySelector(`#counts li[data-state="${state}"] .count`);
      if (item) item.textContent = String(count);
    }
    wanted = info.revision;
    redraw();
  });
}

// Job page: the log's lines as they arrive, the builder's steps as collapsible sections, the
// state, timings and buttons kept up to date.
//
// The server marks the builder's own lines (`step-header`, `step-end`: see `_line_html`); the
// sections are made here, line by line, because the log arrives in chunks that cut sections
// anywhere. Lines outside steps stay plain in the log.
function logSections(log) {
  let step = null;  // the section of the step being read, until its end line

  function startStep() {
    const details = document.createElement("details");
    details.className = "step";
    details.open = true;  // a running step shows its output; a cached one folds at its end
    const summary = document.createElement("summary");
    const title = document.createElement("div");
    title.className = "step-title";
    const outcome = document.createElement("span");
    outcome.className = "step-outcome";
    title.append(outcome);
    summary.append(title);
    const body = document.createElement("div");
    body.className = "step-body";
    details.append(summary, body);
    log.append(details);
    return {details, title, outcome, body};
  }

  function endStep(line) {
    const cached = line.dataset.cached === "true";
    step.details.classList.add(cached ? "step-cached" : "step-saved");
    step.outcome.textContent = (cached ? "using cache " : "saved as ") + line.dataset.step;
    if (cached && !step.details.contains(targetLine())) step.details.open = false;
    step.body.append(line);
    step = null;
  }

  return {
    add(line) {
      if (line.classList.contains("step-header")) {
        // A long op's header spans several lines: they come before any output of its step.
        if (step === null || step.body.childElementCount > 0) step = startStep();
        step.title.insertBefore(line, step.outcome);
      } else if (line.classList.contains("step-end") && step !== null) {
        endStep(line);
      } else {
        (step === null ? log : step.body).append(line);
      }
    },
    // The job has ended: if it failed, a step without an end line is the one that failed.
    finish(state) {
      if (step === null || state !== "failed") return null;
      step.details.classList.add("step-failed");
      step.details.open = true;
      step.outcome.textContent = "failed";
      return step.details;
    },
  };
}

function targetLine() {
  const hash = window.location.hash;
  return hash.startsWith("#L") ? document.getElementById(hash.slice(1)) : null;
}

// Show the line the URL names (#L12), opening the section it is in; false if it is not there.
function showTargetLine() {
  const line = targetLine();
  if (line === null) return false;
  for (const section of document.querySelectorAll("#log details.step")) {
    if (section.contains(line)) section.open = true;
  }
  for (const old of document.querySelectorAll("#log .line.target")) old.classList.remove("target");
  line.classList.add("target");
  line.scrollIntoView();
  return true;
}

function showTimings(timings) {
  for (const [name, text] of Object.entries(timings)) {
    const element = document.getElementById("job-" + name);
    if (element) element.textContent = text;
  }
}

function followLog(log) {
  let jumped = false;
  const jobState = document.getElementById("job-state");
  const sections = logSections(log);
  const template = document.createElement("template");

  const events = new EventSource(log.dataset.src);
  // Every event's data is JSON, so that no byte of a log can end an event's field.
  events.addEventListener("lines", (event) => {
    template.innerHTML = JSON.parse(event.data);
    for (const line of [...template.content.querySelectorAll(".line")]) sections.add(line);
    if (!jumped) jumped = showTargetLine();
  });
  events.addEventListener("state", (event) => setState(jobState, JSON.parse(event.data)));
  events.addEventListener("timings", (event) => showTimings(JSON.parse(event.data)));
  events.addEventListener("end", (event) => {
    events.close();  // otherwise the browser would reconnect and stream the log again
    const outcome = JSON.parse(event.data);
    setState(jobState, outcome.state);
    showTimings(outcome);
    for (const [name, text] of [["error", outcome.error], ["skipped", outcome.skipped]]) {
      document.getElementById("job-" + name).textContent = text || "";
      document.getElementById("job-" + name + "-row").hidden = !text;
    }
    for (const id of ["cancel", "start-now"]) {
      const button = document.getElementById(id);
      if (button) button.closest("form").remove();
    }
    const rebuild = document.getElementById("rebuild");
    if (rebuild) rebuild.closest("form").hidden = false;
    const failed = sections.finish(outcome.state);
    if (failed !== null && !jumped) failed.scrollIntoView();
    log.dataset.complete = "true";
  });
  // A line number clicked, or a link to a line followed, while the page is open.
  window.addEventListener("hashchange", showTargetLine);
}

document.addEventListener("DOMContentLoaded", () => {
  const diagram = document.getElementById("diagram");
  if (diagram) followPipeline(diagram);
  const log = document.getElementById("log");
  if (log) followLog(log);
});
