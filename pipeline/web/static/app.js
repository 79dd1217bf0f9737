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

// Job page: append log lines as they arrive; keep the state and buttons up to date.
function followLog(log) {
  let jumped = false;
  const jobState = document.getElementById("job-state");

  function jumpToLine() {
    const hash = window.location.hash;
    if (jumped || !hash.startsWith("#L")) return;
    const line = document.getElementById(hash.slice(1));
    if (line) {
      jumped = true;
      line.classList.add("target");
      line.scrollIntoView();
    }
  }

  const events = new EventSource(log.dataset.src);
  // Every event's data is JSON, so that no byte of a log can end an event's field.
  events.addEventListener("lines", (event) => {
    log.insertAdjacentHTML("beforeend", JSON.parse(event.data));
    jumpToLine();
  });
  events.addEventListener("state", (event) => setState(jobState, JSON.parse(event.data)));
  events.addEventListener("end", (event) => {
    events.close();  // otherwise the browser would reconnect and stream the log again
    const outcome = JSON.parse(event.data);
    setState(jobState, outcome.state);
    document.getElementById("job-finished").textContent = outcome.finished || "";
    document.getElementById("job-error").textContent = outcome.error || "";
    for (const id of ["cancel", "start-now"]) {
      const button = document.getElementById(id);
      if (button) button.closest("form").remove();
    }
    const rebuild = document.getElementById("rebuild");
    if (rebuild) rebuild.closest("form").hidden = false;
    log.dataset.complete = "true";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const diagram = document.getElementById("diagram");
  if (diagram) followPipeline(diagram);
  const log = document.getElementById("log");
  if (log) followLog(log);
});
