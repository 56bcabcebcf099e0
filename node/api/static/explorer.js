// Live status for the explorer. Everything a peer wrote is written with
// textContent, never innerHTML: the page's CSP allows this file and nothing else.
"use strict";
(function () {
  const TERMINAL = new Set(["completed", "failed", "timeout", "canceled"]);
  const list = document.querySelector("[data-live-list]");
  if (list) {
    const cells = new Map();
    for (const cell of document.querySelectorAll("[data-status-of]")) {
      cells.set(cell.dataset.statusOf, cell);
    }
    const events = new EventSource("/ui/events");
    events.onmessage = (message) => {
      const event = JSON.parse(message.data);
      const cell = cells.get(event.job_id);
      if (cell) {
        cell.textContent = event.status;
        cell.className = "status " + event.status;
      } else {
        const notice = document.querySelector("[data-new-jobs]");
        if (notice) notice.hidden = false;
      }
    };
  }
  const job = document.querySelector("[data-live-job]");
  if (job && !TERMINAL.has(job.dataset.status)) {
    const url = "/v1/jobs/" + encodeURIComponent(job.dataset.liveJob) + "/status/stream";
    const events = new EventSource(url);
    events.onmessage = (message) => {
      const event = JSON.parse(message.data);
      const status = document.querySelector("[data-job-status]");
      if (status && event.status) {
        status.textContent = event.status;
        status.className = "status " + event.status;
      }
      if (TERMINAL.has(event.status)) {
        events.close();
        window.location.reload();
      }
    };
  }
})();
