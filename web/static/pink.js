// PINK's pages. Each page is a server-rendered shell (web/templates) that this
// file fills by calling the REST API (/api/v1) with the session cookie and the
// CSRF header, the same API the CLI uses. No inline code anywhere, so a strict
// Content-Security-Policy holds; everything shown is set as text, never HTML.
'use strict';

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const csrf = ($('meta[name="csrf-token"]') || {}).content || '';
  const isAdmin = document.body.dataset.admin === '1';
  const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  function toLogin() {
    location.assign('/login?next=' + encodeURIComponent(location.pathname + location.search));
  }

  // The API's error message, as written ({"error", "message"}), else the HTTP status.
  async function errorOf(response) {
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    return new ApiError((data && data.message) || `${response.status} ${response.statusText}`.trim(),
                        response.status, data && data.error);
  }

  async function api(path, {method = 'GET', json, signal} = {}) {
    const headers = {'X-CSRF-Token': csrf, Accept: 'application/json'};
    let body;
    if (json !== undefined) { headers['Content-Type'] = 'application/json'; body = JSON.stringify(json); }
    const response = await fetch('/api/v1' + path, {method, headers, body, signal, credentials: 'same-origin'});
    if (response.status === 401) { toLogin(); throw await errorOf(response); }
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // ------------------------------------------------------------------ DOM

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : value);
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
    return append(el, children);
  }

  function say(el, text, kind) {
    el.textContent = text || '';
    el.classList.toggle('error', kind === 'error');
  }

  let toastTimer = null;
  function toast(text, kind) {
    const el = $('#toast');
    say(el, text, kind);
    el.classList.add('shown');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => el.classList.remove('shown'), 6000);
  }

  // A <dialog> asks; resolves true when the person confirms.
  function confirmAction({title, text, ok = 'Confirm'}) {
    const dialog = $('#confirm');
    $('#confirm-title').textContent = title;
    $('#confirm-text').textContent = text || '';
    $('#confirm-yes').textContent = ok;
    dialog.returnValue = '';
    dialog.showModal();
    return new Promise(resolve => dialog.addEventListener('close', () => resolve(dialog.returnValue === 'yes'),
                                                          {once: true}));
  }

  // Refresh only while the page is visible, and at once when it comes back.
  // One chain of timers, however often `run` is called.
  function every(ms, fn) {
    let timer = null, running = false;
    const run = async () => {
      clearTimeout(timer);
      if (running) return;
      running = true;
      try { if (!document.hidden) await fn(); } finally { running = false; }
      clearTimeout(timer);
      timer = setTimeout(run, ms);
    };
    document.addEventListener('visibilitychange', () => { if (!document.hidden) run(); });
    return run;
  }

  function copyButtons(root = document) {
    for (const button of $$('button.copy', root)) {
      button.addEventListener('click', async () => {
        const input = document.getElementById(button.dataset.copy);
        try { await navigator.clipboard.writeText(input.value); } catch (e) {
          input.select(); document.execCommand('copy');
        }
        button.textContent = 'Copied';
        setTimeout(() => { button.textContent = 'Copy'; }, 2000);
      });
    }
  }

  // ------------------------------------------------------------------ formats

  const shortTime = new Intl.DateTimeFormat(undefined, {dateStyle: 'medium', timeStyle: 'short'});
  const longTime = new Intl.DateTimeFormat(undefined, {dateStyle: 'full', timeStyle: 'long'});
  const clockTime = new Intl.DateTimeFormat(undefined, {hour: '2-digit', minute: '2-digit', second: '2-digit'});

  // ISO strings and Unix seconds (nodes' started_at) alike.
  function parseTime(value) {
    if (value === null || value === undefined || value === '') return null;
    const d = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function timeEl(value, format = shortTime, empty = '—') {
    const d = parseTime(value);
    if (!d) return h('span', {class: 'muted'}, empty);
    return h('time', {datetime: d.toISOString(), title: longTime.format(d)}, format.format(d));
  }

  // "45 s", "2 min", "1 h 5 min", "3 d 2 h": what a person needs at a glance.
  function duration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const hours = Math.floor(m / 60);
    if (hours < 24) return `${hours} h` + (m % 60 ? ` ${m % 60} min` : '');
    const days = Math.floor(hours / 24);
    return `${days} d` + (hours % 24 ? ` ${hours % 24} h` : '');
  }

  // Stage timings are often short: keep a decimal there.
  function preciseDuration(ms) {
    if (ms < 10000) return `${(ms / 1000).toFixed(2)} s`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    return duration(ms);
  }

  function size(n) {
    if (n === null || n === undefined) return '—';
    let value = Number(n);
    for (const unit of ['B', 'KiB', 'MiB', 'GiB', 'TiB']) {
      if (value < 1024 || unit === 'TiB') return unit === 'B' ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
      value /= 1024;
    }
    return `${n} B`;
  }

  const hours = x => (Math.round(Number(x || 0) * 100) / 100).toFixed(2);

  // Shell words back from a list, quoted so the server's shlex.split reads the same list.
  function shellWords(words) {
    if (!words) return '';
    return words.map(w => (w !== '' && /^[A-Za-z0-9_@%+=:,./-]+$/.test(w)) ? w : `'${w.replace(/'/g, `'"'"'`)}'`)
      .join(' ');
  }

  // ------------------------------------------------------------------ task states

  const FINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled']);
  const STARTED = new Set(['running', 'exported', ...FINAL]);  // states in which this attempt has a log
  const NEXT_ATTEMPT = /\n\[pink: attempt \d+ started on [^\]\n]*\]\n/;  // web/api.py _follow
  // Each state has a shape as well as a colour (and always its name).
  const ICONS = {queued: '◷', placed: '→', transferred: '→', assigned: '→', running: '▶', exported: '⇣',
                 succeeded: '✓', failed: '✕', timed_out: '◔', cancelled: '⊘',
                 ready: '●', draining: '◐', stopped: '■'};  // nodes' states

  function badge(state) {
    return h('span', {class: `state state-${state}`},
             h('span', {class: 'icon', 'aria-hidden': 'true'}, ICONS[state] || '•'), ` ${state.replace('_', ' ')}`);
  }

  const at = (task, stage) => parseTime((task.timings || {})[stage]);

  // "queued 2 min", "running 5 min", "ran 3 min": how long the task has been, or was, in its state.
  function stateTime(task, now = Date.now()) {
    const created = parseTime(task.created_at);
    const since = d => (d ? duration(now - d) : '');
    switch (task.state) {
      case 'queued': return `queued ${since(at(task, 'queued') || at(task, 'submitted') || created)}`;
      case 'placed': case 'transferred': case 'assigned':
        return `starting ${since(at(task, 'placed') || at(task, task.state))}`;
      case 'running': return `running ${since(at(task, 'running'))}`;
      case 'exported': return `saving output ${since(at(task, 'exported'))}`;
      default: {
        const ran = at(task, 'running'), ended = at(task, 'exported');
        if (ran && ended && ended >= ran) return `ran ${duration(ended - ran)}`;
        const done = at(task, task.state) || parseTime(task.updated_at);
        return created && done ? `ended after ${duration(done - created)}` : '';
      }
    }
  }

  function waitingText(task) {
    if (task.state !== 'queued') return '';
    const place = task.position ? `#${task.position} in the queue` : 'in the queue';
    return task.waiting ? `${place}: ${task.waiting}` : place;
  }

  const taskUrl = id => '/tasks/' + encodeURIComponent(id);
  const againUrl = id => '/submit?again=' + encodeURIComponent(id);
  const AGAIN_TIP = 'Opens the submit form with the same parameters; choose the archive again ' +
                    '(PINK does not keep an image once its task has ended).';

  // Cancel (a live task) or delete (a final one), after a confirmation; true when done.
  async function cancelOrDelete(task) {
    const live = !FINAL.has(task.state);
    const ok = await confirmAction(live
      ? {title: `Cancel task ${task.name}?`, ok: 'Cancel task',
         text: 'A task that has not started ends now; a running one is stopped. This cannot be undone.'}
      : {title: `Delete task ${task.name}?`, ok: 'Delete task',
         text: 'Its output and logs are deleted and it leaves your history. This cannot be undone.'});
    if (!ok) return false;
    try {
      await api('/tasks/' + encodeURIComponent(task.id), {method: 'DELETE'});
      toast(live ? `Cancel requested for ${task.name}.` : `Deleted ${task.name}.`);
      return true;
    } catch (e) {
      toast(e.message, 'error');
      return false;
    }
  }

  // ------------------------------------------------------------------ tasks page

  function tasksPage() {
    const here = new URLSearchParams(location.search);
    const query = new URLSearchParams({limit: '25'});
    for (const key of ['state', 'name', 'user', 'cursor', 'limit']) if (here.get(key)) query.set(key, here.get(key));
    const tbody = $('#tasks tbody');
    const status = $('#tasks-status');
    const rows = new Map();  // task id -> {tr, sig, task}
    let anyLive = true;

    function row(task) {
      const live = !FINAL.has(task.state);
      const stateCell = h('td', {'data-label': 'State'}, badge(task.state));
      const notes = [waitingText(task), task.cancel_requested && live ? 'cancelling…' : '',
                     task.attempt > 1 ? `attempt ${task.attempt}` : '', task.error || ''].filter(Boolean);
      if (notes.length) stateCell.append(h('div', {class: 'note-small'}, notes.join(' · ')));
      const action = h('button', {type: 'button', class: live ? 'small' : 'small danger-quiet',
                                  'data-focus': `${task.id}:action`,
                                  'aria-label': `${live ? 'Cancel' : 'Delete'} task ${task.name}`},
                       live ? 'Cancel' : 'Delete');
      action.addEventListener('click', async () => { if (await cancelOrDelete(rows.get(task.id).task)) load(); });
      return h('tr', {'data-id': task.id, class: `row-${task.state}`},
        h('td', {'data-label': 'Task'}, h('a', {href: taskUrl(task.id)}, task.name || task.id),
          h('div', {class: 'muted small'}, h('code', null, task.id))),
        isAdmin ? h('td', {'data-label': 'User'}, task.user) : null,
        stateCell,
        h('td', {'data-label': 'Time', class: 'elapsed'}, stateTime(task)),
        h('td', {'data-label': 'Submitted'}, timeEl(task.created_at)),
        h('td', {'data-label': 'Node'}, task.node || h('span', {class: 'muted'}, '—'),
          task.gpus && task.gpus.length ? h('div', {class: 'muted small'}, `${task.gpus.length} GPU${task.gpus.length === 1 ? '' : 's'}`) : null),
        h('td', {'data-label': 'Exit'}, task.exit_code ?? h('span', {class: 'muted'}, '—')),
        h('td', {class: 'row-actions'},
          h('a', {class: 'button small', href: againUrl(task.id), title: AGAIN_TIP,
                  'data-focus': `${task.id}:again`, 'aria-label': `Run ${task.name} again`}, 'Run again'),
          action));
    }

    function render(data) {
      const seen = new Set();
      let previous = null;
      for (const task of data.tasks) {
        seen.add(task.id);
        const sig = JSON.stringify([task.state, task.attempt, task.node, task.exit_code, task.position,
                                    task.waiting, task.cancel_requested, task.name, task.error, task.gpus]);
        let entry = rows.get(task.id);
        if (!entry || entry.sig !== sig) {
          const tr = row(task);
          if (entry) {  // changed: swap the row, keeping the focus where it was
            const focused = entry.tr.contains(document.activeElement) && document.activeElement.dataset.focus;
            entry.tr.replaceWith(tr);
            if (focused) { const again = tr.querySelector(`[data-focus="${CSS.escape(focused)}"]`); if (again) again.focus(); }
          }
          entry = {tr, sig, task};
          rows.set(task.id, entry);
        }
        entry.task = task;
        const wanted = previous ? previous.nextSibling : tbody.firstChild;
        if (wanted !== entry.tr) tbody.insertBefore(entry.tr, wanted);
        previous = entry.tr;
      }
      for (const [id, entry] of rows) if (!seen.has(id)) { entry.tr.remove(); rows.delete(id); }
      tick();
      anyLive = data.tasks.some(t => !FINAL.has(t.state));
      $('#tasks-empty').hidden = data.tasks.length > 0;
      const next = $('#page-next'), newest = $('#page-newest');
      const base = new URLSearchParams(here);
      base.delete('cursor');
      newest.hidden = !here.get('cursor');
      newest.href = '/?' + base;
      if (data.next) { base.set('cursor', data.next); next.href = '/?' + base; }
      next.hidden = !data.next;
    }

    function tick() {
      const now = Date.now();
      for (const {tr, task} of rows.values()) {
        const cell = tr.querySelector('.elapsed');
        const text = stateTime(task, now);
        if (cell.textContent !== text) cell.textContent = text;
      }
    }

    let busy = false;
    async function load() {
      if (busy || $('#confirm').open) return;  // rows stay put while a dialog asks about one
      busy = true;
      try {
        render(await api('/tasks?' + query));
        say(status, '');
      } catch (e) {
        say(status, e.message, 'error');
      } finally {
        busy = false;
      }
    }

    // The first page every few seconds (new tasks appear there); an older page only while it shows live tasks.
    const refresh = every(4000, () => (!query.has('cursor') || anyLive ? load() : tick()));
    load().then(() => setTimeout(refresh, 4000));
  }

  // ------------------------------------------------------------------ submit page

  function submitPage() {
    const form = $('#submit-form');
    const input = $('#archive');
    const drop = $('#drop');
    const fileName = $('#file-name');
    const status = $('#upload-status');
    const envRows = $('#env-rows');
    const progress = $('#progress');
    const progressText = $('#progress-text');
    const cancelButton = $('#upload-cancel');
    const uploadButton = $('#upload');
    let file = null;
    let xhr = null;

    function setFile(chosen) {
      file = chosen || null;
      fileName.textContent = file ? `${file.name} · ${size(file.size)}` : 'No file chosen';
      drop.classList.toggle('has-file', Boolean(file));
    }
    input.addEventListener('change', () => setFile(input.files[0]));
    for (const type of ['dragenter', 'dragover']) {
      drop.addEventListener(type, e => { e.preventDefault(); drop.classList.add('over'); });
    }
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', e => {
      e.preventDefault();
      drop.classList.remove('over');
      const files = e.dataTransfer && e.dataTransfer.files;
      if (!files || !files.length) return;
      try { input.files = files; } catch (err) { /* older browsers: keep our own reference */ }
      setFile(files[0]);
    });
    // Dropping a file anywhere else must not navigate away from the form.
    window.addEventListener('dragover', e => e.preventDefault());
    window.addEventListener('drop', e => e.preventDefault());

    function addEnv(key = '', value = '') {
      const row = $('#env-row').content.firstElementChild.cloneNode(true);
      $('.env-key', row).value = key;
      $('.env-value', row).value = value;
      $('.env-remove', row).addEventListener('click', () => { row.remove(); $('#env-add').focus(); });
      envRows.append(row);
      return row;
    }
    $('#env-add').addEventListener('click', () => $('.env-key', addEnv()).focus());

    const showPath = () => { $('#output-path-field').hidden = form.output_kind.value !== 'path'; };
    form.output_kind.addEventListener('change', () => { showPath(); if (!$('#output-path-field').hidden) form.output.focus(); });

    async function prefill(id) {
      const note = $('#again-note');
      note.hidden = false;
      try {
        const {task} = await api('/tasks/' + encodeURIComponent(id));
        const p = task.params || {};
        form.name.value = p.name || task.name || '';
        form.cmd.value = shellWords(p.cmd);
        form.entrypoint.value = shellWords(p.entrypoint);
        form.gpus.value = p.gpus ?? 0;
        const unit = [3600, 60, 1].find(u => p.timeout && p.timeout % u === 0) || 1;
        form.timeout.value = p.timeout ? p.timeout / unit : '';
        form.timeout_unit.value = String(unit);
        const whole = !p.output || p.output === 'full' || p.output === 'changes';
        form.output_kind.value = whole ? (p.output || 'full') : 'path';
        form.output.value = whole ? '' : p.output;
        showPath();
        form.compression.value = p.compression || 'zstd';
        if (form.priority) form.priority.value = p.priority ?? 0;
        envRows.replaceChildren();
        for (const [key, value] of Object.entries(p.env || {})) addEnv(key, value);
        const same = h('button', {type: 'button', class: 'small', id: 'rerun'}, 'Run with the same image');
        note.replaceChildren('Parameters copied from task ', h('a', {href: taskUrl(task.id)}, task.name),
                             '. Change them if you like, then ', same,
                             ' (while the web node still keeps its layers), or choose an archive.');
        if (task.image && task.image.repo_tags && task.image.repo_tags.length) {
          note.append(` It ran ${task.image.repo_tags.join(', ')}.`);
        }
        same.addEventListener('click', async () => {
          let q;
          try { q = query(); } catch (err) { say(status, err.message, 'error'); return; }
          same.disabled = true;
          try {
            const made = await api(`/tasks/${encodeURIComponent(id)}/rerun?${q}`, {method: 'POST'});
            location.assign(taskUrl(made.task.id));
          } catch (err) {
            say(status, err.message, 'error');  // as the API wrote it, e.g. the image is no longer kept
            same.disabled = false;
          }
        });
      } catch (e) {
        note.textContent = `Could not copy the parameters of task ${id}: ${e.message}`;
        note.classList.add('error');
      }
    }

    function query() {
      const q = new URLSearchParams();
      for (const key of ['name', 'cmd', 'entrypoint', 'compression']) {
        const value = form[key].value.trim();
        if (value) q.set(key, value);
      }
      const kind = form.output_kind.value;
      q.set('output', kind === 'path' ? form.output.value.trim() : kind);
      if (form.gpus.value) q.set('gpus', form.gpus.value);
      if (form.timeout.value) {
        const seconds = Number(form.timeout.value) * Number(form.timeout_unit.value);
        if (!Number.isFinite(seconds) || seconds < 1) throw new Error('The timeout must be a positive number.');
        q.set('timeout', String(Math.round(seconds)));
      }
      if (form.priority && form.priority.value && form.priority.value !== '0') q.set('priority', form.priority.value);
      for (const row of $$('.env-row', envRows)) {
        const key = $('.env-key', row).value.trim(), value = $('.env-value', row).value;
        if (!key && !value) continue;
        if (!key) throw new Error('Each environment variable needs a name.');
        q.append('env', `${key}=${value}`);
      }
      return q;
    }

    function busy(on) {
      uploadButton.disabled = on;
      cancelButton.hidden = !on;
      if (on) cancelButton.focus();
    }

    form.addEventListener('submit', e => {
      e.preventDefault();
      if (xhr) return;
      say(status, '');
      if (!file) { say(status, 'Choose an archive first (drop it on the box above).', 'error'); input.focus(); return; }
      let q;
      try { q = query(); } catch (err) { say(status, err.message, 'error'); return; }
      upload(q);
    });
    cancelButton.addEventListener('click', () => { if (xhr) xhr.abort(); });
    window.addEventListener('beforeunload', e => { if (xhr) e.preventDefault(); });

    function upload(q) {
      const started = performance.now();
      let rate = 0, last = {t: started, loaded: 0};
      $('#upload-progress').hidden = false;
      progress.value = 0;
      progress.max = 100;
      progressText.textContent = `0 % of ${size(file.size)}`;
      xhr = new XMLHttpRequest();
      xhr.upload.addEventListener('progress', e => {
        if (!e.lengthComputable) return;
        const now = performance.now(), dt = (now - last.t) / 1000;
        if (dt > 0.2 || e.loaded === e.total) {
          const instant = (e.loaded - last.loaded) / Math.max(dt, 0.001);
          rate = rate ? 0.7 * rate + 0.3 * instant : instant;  // smoothed, so the estimate does not jump
          last = {t: now, loaded: e.loaded};
        }
        const percent = Math.floor(100 * e.loaded / e.total);
        progress.value = percent;
        const left = rate > 0 && e.loaded < e.total ? ` · about ${duration(1000 * (e.total - e.loaded) / rate)} left` : '';
        progressText.textContent = `${percent} % · ${size(e.loaded)} of ${size(e.total)}` +
          (rate > 0 ? ` · ${size(rate)}/s` : '') + left;
      });
      xhr.upload.addEventListener('load', () => {
        progressText.textContent = `100 % · ${size(file.size)} in ${preciseDuration(performance.now() - started)}` +
          ' · validating the image…';
      });
      xhr.addEventListener('load', () => {
        const done = xhr;
        xhr = null;
        busy(false);
        let data = {};
        try { data = JSON.parse(done.responseText || '{}'); } catch (err) { /* not JSON */ }
        if (done.status === 201 && data.task) {
          const task = data.task;
          progressText.textContent = `100 % · ${size(file.size)} in ${preciseDuration(performance.now() - started)}`;
          status.replaceChildren(`Submitted ${task.name}: `,
                                 h('a', {href: taskUrl(task.id), id: 'submitted-link'}, `follow task ${task.id}`), '.');
          status.classList.remove('error');
          toast(`Task ${task.name} submitted.`);
        } else {
          say(status, data.message || `The upload failed: ${done.status} ${done.statusText}`, 'error');
        }
      });
      xhr.addEventListener('error', () => {
        xhr = null; busy(false);
        say(status, 'The upload failed: the connection was lost. Nothing was submitted; try again.', 'error');
      });
      xhr.addEventListener('abort', () => {
        xhr = null; busy(false);
        progressText.textContent = 'cancelled';
        say(status, 'Upload cancelled: nothing was submitted.');
      });
      xhr.open('POST', '/api/v1/tasks?' + q);
      xhr.setRequestHeader('Content-Type', 'application/x-tar');
      xhr.setRequestHeader('X-CSRF-Token', csrf);
      xhr.send(file);
      busy(true);
    }

    const again = document.body.dataset.again;
    if (again) prefill(again);
  }

  // ------------------------------------------------------------------ task page

  const STAGES = [  // [label, from (first recorded wins), to]
    ['Waiting in the queue', ['queued', 'submitted'], 'placed'],
    ['Copying the image to the runner', ['placed'], 'transferred'],
    ['Handing it to the runner', ['transferred'], 'assigned'],
    ['Starting on the runner', ['assigned'], 'running'],
    ['Running, then exporting', ['running'], 'exported'],
    ['Storing the output', ['exported'], 'final'],
  ];

  // Whose failure it was (pink/failures.py): the task's own are not tried again.
  const FAILED_BY = {
    task: 'The task failed by itself: ',
    infrastructure: 'PINK failed this task, not its code: ',
  };

  function taskPage() {
    const id = document.body.dataset.taskId;
    const path = '/tasks/' + encodeURIComponent(id);
    const errorBox = $('#task-error');
    let task = null;

    function facts(dl, items) {
      dl.replaceChildren();
      for (const [term, value] of items) {
        if (value === null || value === undefined || value === '' || (Array.isArray(value) && !value.length)) continue;
        dl.append(h('dt', null, term), h('dd', null, value));
      }
    }

    const codeList = values => h('ul', {class: 'plain'}, values.map(v => h('li', null, h('code', null, v))));

    function render(t) {
      const final = FINAL.has(t.state);
      document.title = `${t.name} · PINK`;
      $('#task-name').textContent = t.name;
      const stateBox = $('#task-state');
      stateBox.replaceChildren(badge(t.state), ' ', h('span', {class: 'muted elapsed'}, stateTime(t)));
      if (t.cancel_requested && !final) stateBox.append(h('span', {class: 'muted'}, ' · cancelling…'));
      const sweepLink = $('#task-sweep');  // an index of a sweep links to it (web/templates/sweep.html)
      if (sweepLink && t.sweep) {
        sweepLink.replaceChildren(`Index ${t.sweep.index} of ${t.sweep.size} in sweep `,
                                  h('a', {href: `/sweeps/${encodeURIComponent(t.sweep.id)}`}, t.sweep.id));
        sweepLink.hidden = false;
      }

      const problems = [t.error, t.export_error && `export: ${t.export_error}`].filter(Boolean);
      errorBox.hidden = !problems.length;
      errorBox.textContent = problems.join(' — ');
      const failure = $('#task-failure');
      failure.hidden = !t.failure;
      if (t.failure) {
        const whose = FAILED_BY[t.failure.class] || 'It failed: ';
        failure.replaceChildren(h('strong', null, whose), `${t.failure.summary}. `, t.failure.advice || '');
      }

      $('#task-actions').hidden = false;
      const download = $('#download');
      download.hidden = !t.output;
      if (t.output) {
        download.href = '/api/v1' + path + '/output';
        download.textContent = `Download ${t.output.filename} (${size(t.output.size)})`;
      }
      $('#again').href = againUrl(t.id);
      $('#cancel').hidden = final;
      $('#delete').hidden = !final;
      const note = $('#output-note');
      note.replaceChildren();
      if (t.expired_at) append(note, ['The output and logs expired on ', timeEl(t.expired_at), '.']);
      else if (t.output && t.expires_at) append(note, ['The output is kept until ', timeEl(t.expires_at), '.']);
      else if (final && !t.output) note.textContent = 'This task left no output to download.';
      note.hidden = !note.childNodes.length;

      const out = t.output ? `${size(t.output.size)}, ${t.output.compression}` : null;
      facts($('#summary'), [
        ['Waiting', waitingText(t)],
        ['User', isAdmin ? t.user : null],
        ['Submitted', timeEl(t.created_at)],
        ['Last change', timeEl(t.updated_at)],
        ['Attempt', String(t.attempt)],
        ['Node', t.node],
        ['GPUs', t.gpus && t.gpus.length ? codeList(t.gpus) : null],
        ['Exit code', t.exit_code === null || t.exit_code === undefined ? null : String(t.exit_code)],
        ['Error', t.error],
        ['Failure', t.failure ? `${t.failure.class}: ${t.failure.summary}` : null],
        ['Output', out],
        ['Output expires', t.output && t.expires_at ? timeEl(t.expires_at) : null],
        ['Log', t.logs_truncated ? `the archive keeps its end: ${size(t.logs_truncated)} of the start left out` : null],
        ['GPU usage', gpuUsageText(t, final)],
      ]);

      const image = t.image || {};
      facts($('#image'), [
        ['Tags', image.repo_tags && image.repo_tags.length ? codeList(image.repo_tags) : 'none'],
        ['Image ID', image.image_id ? h('code', {class: 'digest'}, image.image_id) : null],
        ['Archive digest', image.sha256 ? h('code', {class: 'digest'}, `sha256:${image.sha256}`) : null],
        ['Archive size', size(image.size)],
        ['Layout', image.layout],
        ['Platform', image.platform],
        ['Needs CUDA', image.cuda ? `${image.cuda} or newer (its driver's)` : null],
      ]);
      const p = t.params || {};
      const env = Object.entries(p.env || {});
      facts($('#params'), [
        ['Command', p.cmd ? h('code', null, shellWords(p.cmd)) : "the image's CMD"],
        ['Entrypoint', p.entrypoint ? h('code', null, shellWords(p.entrypoint)) : "the image's ENTRYPOINT"],
        ['Environment', env.length ? codeList(env.map(([k, v]) => `${k}=${v}`)) : null],
        ['GPUs asked', String(p.gpus ?? 0)],
        ['Timeout', p.timeout ? duration(p.timeout * 1000) : null],
        ['Output', {full: 'the whole filesystem', changes: 'what the task added or changed'}[p.output] ||
                   (p.output ? h('code', null, p.output) : null)],
        ['Compression', p.compression],
        ['Priority', p.priority ? String(p.priority) : null],
      ]);

      const timeline = $('#timeline');
      timeline.replaceChildren();
      let previous = null;
      for (const step of t.history || []) {
        const when = parseTime(step.at);
        timeline.append(h('li', null, timeEl(step.at, clockTime), ' ', badge(step.state),
          previous && when ? h('span', {class: 'muted small'}, ` +${preciseDuration(when - previous)}`) : null,
          step.detail ? h('span', {class: 'detail'}, step.detail) : null));
        previous = when || previous;
      }

      const stages = $('#stages tbody');
      stages.replaceChildren();
      for (const [label, froms, to] of STAGES) {
        const end = to === 'final' ? (final ? at(t, t.state) : null) : at(t, to);
        const start = froms.map(f => at(t, f)).find(d => d && (!end || d <= end));
        if (!start || !end) continue;
        stages.append(h('tr', null, h('th', {scope: 'row'}, label), h('td', null, preciseDuration(end - start))));
      }
      const first = at(t, 'submitted') || parseTime(t.created_at), last = final ? at(t, t.state) : null;
      if (first && last) stages.append(h('tr', {class: 'total'}, h('th', {scope: 'row'}, 'Total'),
                                            h('td', null, preciseDuration(last - first))));
      if (!stages.childNodes.length) stages.append(h('tr', null, h('td', {colspan: '2', class: 'muted'}, 'Nothing measured yet.')));
      const tm = t.timings || {};
      const rate = tm.transfer_bytes && tm.transfer_seconds ? ` (${size(tm.transfer_bytes / tm.transfer_seconds)}/s)` : '';
      facts($('#measures'), [
        ['Uploaded', tm.upload_bytes ? size(tm.upload_bytes) : null],
        ['Image copy', tm.transfer_seconds !== undefined
          ? (tm.transfer_bytes ? `${size(tm.transfer_bytes)} in ${preciseDuration(tm.transfer_seconds * 1000)}${rate}`
            : 'skipped: the runner had it') : null],
        ['Image load', tm.image_load_seconds !== undefined
          ? (tm.image_load_seconds ? preciseDuration(tm.image_load_seconds * 1000) : 'cached on the runner') : null],
        ['Export', tm.export_seconds !== undefined ? preciseDuration(tm.export_seconds * 1000) : null],
      ]);
    }

    // ---- logs: follow this attempt's log; a new attempt starts a new section.
    const pre = $('#logs');
    const logsState = $('#logs-state');
    const LOG_KEEP = 1 << 20;  // characters kept on the page; the download has it all
    let followed = null;  // {attempt, controller}

    function section(label) {
      if (label) pre.append(h('span', {class: 'log-sep'}, label));
      const text = document.createTextNode('');
      pre.append(text);
      return text;
    }

    function write(text, chunk) {
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
      text.appendData(chunk);
      if (text.length > 1.5 * LOG_KEEP) {
        text.deleteData(0, text.length - LOG_KEEP);
        if (!pre.querySelector('.log-cut')) {
          pre.prepend(h('span', {class: 'log-sep log-cut'}, '… earlier lines are left out here: download the whole log'));
        }
      }
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }

    // The server ends a follow when the task is final, and also after an hour
    // (log_follow_seconds) or a lost connection: then it is resumed at the byte
    // offset read so far in this attempt's log.
    async function follow(attempt, label) {
      if (followed) followed.controller.abort();
      const controller = new AbortController();
      followed = {attempt, controller};
      const text = section(label);
      const decoder = new TextDecoder();  // one for the whole log: a resume may split a character
      let offset = 0;  // bytes of this attempt's log read
      for (let tries = 0; !controller.signal.aborted; tries++) {
        logsState.textContent = 'following…';
        try {
          const response = await fetch(`/api/v1${path}/logs?follow=1&attempt=${attempt}&offset=${offset}`,
                                       {credentials: 'same-origin', signal: controller.signal});
          if (!response.ok) {
            const err = await errorOf(response);
            if (response.status === 401) toLogin();
            logsState.textContent = err.message;
            if (response.status < 500 && response.status !== 429) return;
            throw err;
          }
          const reader = response.body.getReader();
          for (;;) {
            const {done, value} = await reader.read();
            if (done) break;
            offset += value.length;
            write(text, decoder.decode(value, {stream: true}));
            // The server goes on into the next attempt's log after a line saying so;
            // this page gives each attempt a section of its own (followLogs).
            const next = NEXT_ATTEMPT.exec(text.data);
            if (next) {
              text.data = text.data.slice(0, next.index);
              reader.cancel();
              return;
            }
          }
          const {task: now} = await api(path);
          if (FINAL.has(now.state) || now.attempt !== attempt) {
            write(text, decoder.decode());
            logsState.textContent = text.length ? 'end of the log' : 'the task wrote no log';
            return;
          }
          tries = -1;  // the server's time limit, not a failure: resume at once
        } catch (e) {
          if (controller.signal.aborted) return;
          if (!e.status) logsState.textContent = 'connection lost; following again…';
          await sleep(Math.min(1000 * 2 ** tries, 15000));
        }
      }
    }

    // Attempt 1 is followed from the start (the server waits for its log);
    // a later attempt once it runs, so the previous attempt's log is not read twice.
    function followLogs(t) {
      if (followed && followed.attempt === t.attempt) return;
      if (t.attempt > 1 && !STARTED.has(t.state)) {
        logsState.textContent = `attempt ${t.attempt} waits to start; its log follows here`;
        return;
      }
      follow(t.attempt, followed || t.attempt > 1 ? `— attempt ${t.attempt} —` : null);
    }

    async function actOn(button) {
      button.disabled = true;
      try { if (await cancelOrDelete(task) && FINAL.has(task.state)) location.assign('/'); }
      finally { button.disabled = false; }
    }
    $('#cancel').addEventListener('click', e => actOn(e.currentTarget).then(() => poll(0)));
    $('#delete').addEventListener('click', e => actOn(e.currentTarget));

    // Long polls: the server answers as soon as the state or attempt changes (or after `wait`).
    let polling = null;
    // Deliveries of the task's notifications; asked for again while one is pending
    // (a retry may come minutes after the task ended).
    function renderNotifications(list) {
      const section = $('#notifications-section');
      section.hidden = !list || !list.length;
      if (section.hidden) return;
      $('#notifications tbody').replaceChildren(...list.map(n => h('tr', {'data-state': n.state},
        h('td', {'data-label': 'Event'}, n.event),
        h('td', {'data-label': 'Channel'}, n.channel),
        h('td', {'data-label': 'To'}, h('code', null, n.target)),
        h('td', {'data-label': 'State', class: 'notify-state'}, n.state),
        h('td', {'data-label': 'Tries'}, String(n.attempts)),
        h('td', {'data-label': 'Last failure', class: 'notify-error'}, n.last_error || '—'))));
    }
    const refreshNotifications = every(5000, async () => {
      if (!task || !FINAL.has(task.state)) return;
      const pending = !task.notifications || task.notifications.some(n => n.state === 'pending');
      const recent = Date.now() - parseTime(task.updated_at) < 120000;
      if (!pending && !(recent && !task.notifications.length)) return;
      try {
        const {task: t} = await api(path);
        task = t;
        renderNotifications(t.notifications);
      } catch (e) { /* the next refresh tries again */ }
    });

    async function poll(wait = 10) {
      const mine = polling = {};
      for (let tries = 0; polling === mine;) {
        try {
          const seen = task && wait ? `&seen=${encodeURIComponent(task.state + ':' + task.attempt)}` : '';
          const asked = Date.now();
          const {task: t} = await api(`${path}?wait=${wait}${seen}`);
          if (polling !== mine) return;
          // unchanged at once: the server had no long-poll slot free for us (see the API)
          const unchanged = task && seen && t.state === task.state && t.attempt === task.attempt;
          if (unchanged && Date.now() - asked < 1000) await sleep(3000);
          if (polling !== mine) return;
          task = t;
          render(t);
          renderNotifications(t.notifications);
          followLogs(t);
          tries = 0;
          wait = 10;
          if (FINAL.has(t.state)) { refreshNotifications(); return; }
        } catch (e) {
          if (polling !== mine) return;
          errorBox.hidden = false;
          errorBox.textContent = e.message;
          if (e.status === 404 || e.status === 403) return;
          await sleep(Math.min(1000 * 2 ** tries++, 15000));
        }
      }
    }
    setInterval(() => {
      if (!task || document.hidden) return;
      for (const el of $$('.elapsed')) el.textContent = stateTime(task);
    }, 5000);
    poll(0);
  }

  // ------------------------------------------------------------------ nodes page

  const NODE_ACTIONS = [  // [label, action, query, states it applies to, explanation]
    ['Drain', 'drain', '', ['ready'], 'No new task goes to {node}; tasks placed or running there finish.'],
    ['Drain now', 'drain', '?now=1', ['ready', 'draining'],
     'No new task goes to {node}, and tasks placed there that have not started move to other nodes; running tasks finish.'],
    ['Stop', 'stop', '', ['ready', 'draining'],
     'Tasks running on {node} are stopped and queued again elsewhere; nothing new goes there.'],
    ['Resume', 'resume', '', ['draining', 'stopped'], '{node} takes new tasks again.'],
  ];

  function gpuItem(gpu, stats) {
    const parts = [h('code', {class: 'digest'}, gpu.uuid)];
    const facts = [gpu.model && gpu.model !== 'declared' ? gpu.model : (gpu.model === 'declared' ? 'declared (no device)' : null),
                   gpu.memory ? `${size(gpu.memory)} memory` : null].filter(Boolean);
    const li = h('li', {class: 'gpu'}, h('div', null, h('strong', null, `GPU ${gpu.index ?? ''}`), ' ', facts.join(' · ')),
                 h('div', {class: 'muted small'}, parts));
    if (stats) {
      const util = Math.round(100 * Number(stats.utilization));  // NVML's busy fraction, 0 to 1
      const used = stats.memory_used, total = stats.memory_total || gpu.memory;
      const utilId = `u-${gpu.uuid}`, memId = `m-${gpu.uuid}`;
      li.append(h('div', {class: 'meters'},
        h('span', {id: utilId}, `${Number.isFinite(util) ? util : '—'} % busy`),
        h('meter', {min: '0', max: '100', value: String(Number.isFinite(util) ? util : 0), 'aria-labelledby': utilId}),
        used !== undefined && used !== null ? h('span', {id: memId}, `${size(used)}${total ? ' of ' + size(total) : ''} used`) : null,
        used !== undefined && used !== null && total
          ? h('meter', {min: '0', max: String(total), value: String(used), high: String(0.9 * total), 'aria-labelledby': memId}) : null));
    }
    return li;
  }

  function spool(node) {
    const waiting = node.spool_images || 0;
    const parts = [`${waiting} image${waiting === 1 ? '' : 's'} waiting to load`];
    if (node.spool_free !== undefined && node.spool_free !== null) parts.push(`${size(node.spool_free)} free`);
    return parts.join(' · ');
  }

  function nodesPage() {
    const box = $('#nodes');
    const status = $('#nodes-status');

    function card(node) {
      const inventory = node.gpu_inventory && node.gpu_inventory.length
        ? node.gpu_inventory : (node.gpus || []).map((uuid, index) => ({uuid, index}));
      const stats = node.gpu_stats || {};
      const tasks = node.tasks || [];
      const article = h('article', {class: `card node node-${node.state}`, 'data-node': node.name, 'aria-labelledby': `n-${node.name}`},
        h('div', {class: 'title-row'}, h('h2', {id: `n-${node.name}`}, node.name), badge(node.state),
          h('span', {class: 'muted small'}, node.host)),
        h('dl', {class: 'facts'},
          h('dt', null, 'GPUs'),
          h('dd', null, inventory.length
            ? h('ul', {class: 'plain gpus'}, inventory.map(g => gpuItem(g, stats[g.uuid])))
            : 'none', node.gpu_mode && inventory.length ? h('div', {class: 'muted small'}, `mode: ${node.gpu_mode}`) : null),
          h('dt', null, 'Container slots'),
          h('dd', null, `${tasks.length} of ${node.max_containers ?? '?'} in use`,
            h('meter', {min: '0', max: String(node.max_containers || 1), value: String(tasks.length),
                        'aria-label': 'Container slots in use'})),
          h('dt', null, 'Tasks'),
          h('dd', null, tasks.length
            ? h('ul', {class: 'plain'}, tasks.map(id => h('li', null, h('a', {href: taskUrl(id)}, h('code', null, id)))))
            : h('span', {class: 'muted'}, 'none')),
          h('dt', null, 'Runs'),
          h('dd', null, [node.platform || 'platform not reported',
                         node.cuda ? `CUDA ${node.cuda}${node.driver ? ` (driver ${node.driver})` : ''}` : null]
            .filter(Boolean).join(', ')),
          h('dt', null, 'Cached images'),
          h('dd', null, String(node.images ?? 0)),
          h('dt', null, 'Spool'),
          h('dd', null, spool(node)),
          h('dt', null, 'Runner started'),
          h('dd', null, timeEl(node.started_at))));
      if (isAdmin) {
        const actions = h('div', {class: 'actions-row'});
        for (const [label, action, q, states, text] of NODE_ACTIONS) {
          if (!states.includes(node.state)) continue;
          const button = h('button', {type: 'button', class: action === 'resume' ? 'primary' : (action === 'stop' ? 'danger' : ''),
                                      'data-action': label.toLowerCase().replace(' ', '-')}, label);
          button.addEventListener('click', async () => {
            const ok = await confirmAction({title: `${label} ${node.name}?`, ok: label,
                                            text: text.replace('{node}', node.name)});
            if (!ok) return;
            try {
              const answer = await api(`/nodes/${encodeURIComponent(node.name)}/${action}${q}`, {method: 'POST'});
              const moved = answer.moved && answer.moved.length !== undefined ? answer.moved.length : answer.moved;
              toast(`${node.name}: ${answer.node.state}${moved ? ` (${moved} task${moved === 1 ? '' : 's'} moved)` : ''}.`);
            } catch (e) {
              toast(e.message, 'error');
            }
            load();
          });
          actions.append(button);
        }
        article.append(actions);
      }
      return article;
    }

    let shown = '';
    async function load() {
      if ($('#confirm').open) return;  // the cards stay put while a dialog asks about one
      try {
        const {nodes} = await api('/nodes');
        const sig = JSON.stringify(nodes);
        if (sig !== shown) {  // rebuild only on change, keeping the focus on the same button
          const focused = document.activeElement;
          const where = focused && focused.dataset && focused.dataset.action && focused.closest('[data-node]');
          box.replaceChildren(...nodes.map(card));
          shown = sig;
          if (where) {
            const again = box.querySelector(`[data-node="${CSS.escape(where.dataset.node)}"] [data-action="${focused.dataset.action}"]`);
            if (again) again.focus();
          }
        }
        $('#nodes-empty').hidden = nodes.length > 0;
        const gpus = nodes.reduce((n, node) => n + (node.gpus || []).length, 0);
        $('#nodes-summary').textContent = `${nodes.length} runner${nodes.length === 1 ? '' : 's'}, ${gpus} GPU${gpus === 1 ? '' : 's'}` +
          `, ${nodes.filter(n => n.state === 'ready').length} ready`;
        say(status, '');
      } catch (e) {
        say(status, e.message, 'error');
      }
    }
    every(5000, load)();
  }

  // What a run did with its GPUs (the runner's NVML samples), once reported: "not measured"
  // where nothing was (declared GPUs, no GPUs), never zeros.
  function gpuUsageText(t, final) {
    const u = t.gpu_usage;
    if (!u) return final || t.state === 'exported' ? 'not measured' : null;
    return `mean ${u.mean_percent}%, peak ${u.peak_percent}%, peak memory ${size(u.peak_memory_bytes)}, ` +
           `idle ${u.idle_minutes} min (${u.samples} samples over ${(u.measured_seconds / 60).toFixed(1)} min)`;
  }

  // ------------------------------------------------------------------ usage page

  const dateInput = d => `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
  const localDay = text => { const [y, m, d] = text.split('-').map(Number); return new Date(y, m - 1, d); };

  function usageChart(rows, metric, label) {
    const barHeight = 22, gap = 10, labelWidth = 130, width = 640, valueWidth = 90;
    const height = Math.max(1, rows.length) * (barHeight + gap) + gap;
    const max = Math.max(0, ...rows.map(r => Number(r[metric]) || 0));
    const room = width - labelWidth - valueWidth;
    const chart = svg('svg', {viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'usage-caption',
                              class: 'bars', preserveAspectRatio: 'xMinYMin meet'});
    rows.forEach((row, i) => {
      const value = Number(row[metric]) || 0;
      const y = gap + i * (barHeight + gap);
      const w = max > 0 ? Math.max(value > 0 ? 2 : 0, room * value / max) : 0;
      const shown = metric === 'tasks' ? String(value) : hours(value);
      chart.append(svg('g', {class: 'bar'},
        svg('title', null, `${row.user}: ${shown} ${label}`),
        svg('text', {x: labelWidth - 8, y: y + barHeight / 2, 'text-anchor': 'end', 'dominant-baseline': 'central',
                     class: 'bar-label'}, row.user),
        svg('rect', {x: labelWidth, y, width: w.toFixed(1), height: barHeight, rx: 3, class: 'bar-fill'}),
        svg('text', {x: labelWidth + w + 6, y: y + barHeight / 2, 'dominant-baseline': 'central', class: 'bar-value'}, shown)));
    });
    return chart;
  }

  // GPU-hours used and idle, from the tasks whose GPUs were measured: "not measured" for none, never 0.
  // Each says out of how many measured GPU-hours, as unmeasured tasks' hours are in neither.
  function measuredCells(r) {
    const none = v => v === null || v === undefined;
    const of = none(r.gpu_hours_measured) ? '' : ` of ${hours(r.gpu_hours_measured)} measured GPU-h`;
    return [['gpu_hours_used', 'GPU-hours used'], ['gpu_hours_idle', 'GPU-hours idle']].map(([key, label]) =>
      h('td', {class: 'num', 'data-label': label}, none(r[key]) ? 'not measured' : hours(r[key]) + of));
  }

  function usagePage() {
    const form = $('#usage-form');
    const here = new URLSearchParams(location.search);
    const today = new Date();
    const monthAgo = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 30);
    form.since.value = here.get('since') || dateInput(monthAgo);
    form.until.value = here.get('until') || dateInput(today);
    if (form.user) form.user.value = here.get('user') || '';
    if (here.get('metric')) form.metric.value = here.get('metric');
    const status = $('#usage-status');
    let rows = [];

    function draw() {
      const metric = form.metric.value;
      const label = form.metric.selectedOptions[0].textContent;
      const figure = $('#usage-chart');
      const caption = $('#usage-caption');
      caption.textContent = `${label} per user, ${shortDate(form.since.value)} to ${shortDate(form.until.value)}`;
      for (const old of $$('svg', figure)) old.remove();
      if (rows.length) figure.append(usageChart(rows, metric, label));
      figure.hidden = !rows.length;
    }
    const shortDate = text => new Intl.DateTimeFormat(undefined, {dateStyle: 'medium'}).format(localDay(text));

    async function load() {
      const since = localDay(form.since.value), until = localDay(form.until.value);
      if (Number.isNaN(since.getTime()) || Number.isNaN(until.getTime()) || until < since) {
        say(status, 'Choose a start date on or before the end date.', 'error');
        return;
      }
      until.setDate(until.getDate() + 1);  // the end date is included: up to its midnight
      const q = new URLSearchParams({since: since.toISOString(), until: until.toISOString()});
      if (form.user && form.user.value.trim()) q.set('user', form.user.value.trim());
      say(status, 'Loading…');
      try {
        rows = (await api('/usage?' + q)).usage;
      } catch (e) {
        say(status, e.message, 'error');
        return;
      }
      say(status, '');
      const tbody = $('#usage tbody');
      const cells = r => [r.tasks, r.succeeded, r.failed, r.timed_out, r.cancelled].map(v => h('td', {class: 'num'}, String(v)));
      const labels = ['Tasks', 'Succeeded', 'Failed', 'Timed out', 'Cancelled'];
      const labelled = r => cells(r).map((td, i) => { td.setAttribute('data-label', labels[i]); return td; });
      tbody.replaceChildren(...rows.map(r => h('tr', null, h('th', {scope: 'row', 'data-label': 'User'}, r.user), labelled(r),
        h('td', {class: 'num', 'data-label': 'GPU-hours'}, hours(r.gpu_hours)), measuredCells(r),
        h('td', {class: 'num', 'data-label': 'Wall-hours'}, hours(r.wall_hours)))));
      const foot = $('#usage tfoot');
      foot.replaceChildren();
      if (rows.length > 1) {
        const sum = key => rows.reduce((n, r) => n + Number(r[key] || 0), 0);
        const total = {tasks: sum('tasks'), succeeded: sum('succeeded'), failed: sum('failed'),
                       timed_out: sum('timed_out'), cancelled: sum('cancelled')};
        const measured = key => rows.some(r => r[key] !== null && r[key] !== undefined) ? sum(key) : null;
        const usedIdle = {gpu_hours_used: measured('gpu_hours_used'), gpu_hours_idle: measured('gpu_hours_idle'),
                          gpu_hours_measured: measured('gpu_hours_measured')};
        foot.append(h('tr', {class: 'total'}, h('th', {scope: 'row', 'data-label': 'User'}, 'All users'), labelled(total),
          h('td', {class: 'num', 'data-label': 'GPU-hours'}, hours(sum('gpu_hours'))), measuredCells(usedIdle),
          h('td', {class: 'num', 'data-label': 'Wall-hours'}, hours(sum('wall_hours')))));
      }
      $('#usage-empty').hidden = rows.length > 0;
      draw();
    }

    form.addEventListener('submit', e => {
      e.preventDefault();
      const q = new URLSearchParams({since: form.since.value, until: form.until.value, metric: form.metric.value});
      if (form.user && form.user.value.trim()) q.set('user', form.user.value.trim());
      history.replaceState(null, '', '?' + q);
      load();
    });
    form.metric.addEventListener('change', draw);
    load();
  }

  // ------------------------------------------------------------------ account page

  function accountPage() {
    copyButtons();
    const tokenStatus = $('#tokens-status');

    async function loadTokens() {
      try {
        const {tokens} = await api('/tokens');
        $('#tokens tbody').replaceChildren(...tokens.map(tokenRow));
        $('#tokens-empty').hidden = tokens.length > 0;
      } catch (e) {
        say(tokenStatus, e.message, 'error');
      }
    }

    function tokenRow(token) {
      const revoke = h('button', {type: 'button', class: 'small danger-quiet', 'aria-label': `Revoke token ${token.name}`}, 'Revoke');
      revoke.addEventListener('click', async () => {
        const ok = await confirmAction({title: `Revoke token ${token.name}?`, ok: 'Revoke',
                                        text: 'Anything using it (a CLI, a script) stops working at once.'});
        if (!ok) return;
        try {
          await api(`/tokens/${encodeURIComponent(token.id)}`, {method: 'DELETE'});
          say(tokenStatus, `Revoked ${token.name}.`);
        } catch (e) {
          say(tokenStatus, e.message, 'error');
        }
        loadTokens();
      });
      return h('tr', {'data-token': token.id},
        h('td', {'data-label': 'Name'}, token.name),
        h('td', {'data-label': 'Scope'}, token.scope),
        h('td', {'data-label': 'Created'}, timeEl(token.created_at)),
        h('td', {'data-label': 'Last used'}, timeEl(token.last_used_at, shortTime, 'never')),
        h('td', {'data-label': 'Expires'}, timeEl(token.expires_at, shortTime, 'never')),
        h('td', {class: 'row-actions'}, revoke));
    }

    $('#token-form').addEventListener('submit', async e => {
      e.preventDefault();
      const form = e.target;
      const days = form.expires_days.value;
      try {
        const answer = await api('/tokens', {method: 'POST', json: {name: form.name.value.trim(), scope: 'user',
                                                                     expires_days: days ? Number(days) : null}});
        $('#token-secret').hidden = false;
        const value = $('#token-secret-value');
        value.value = answer.secret;
        value.focus();
        value.select();
        say(tokenStatus, `Created ${answer.token.name}.`);
        form.reset();
      } catch (err) {
        say(tokenStatus, err.message, 'error');
      }
      loadTokens();
    });
    loadTokens();
    notificationsForm();
    passwordForm();
    if (isAdmin && $('#users')) usersSection();
  }

  // Your webhook, e-mail and on-running flag, and the secret that signs the webhooks.
  function notificationsForm() {
    const form = $('#notify-form');
    const status = $('#notify-status');

    function show(n) {
      form.webhook.value = (n && n.webhook) || '';
      form.email.value = (n && n.email) || '';
      form.on_running.checked = Boolean(n && n.on_running);
      const mail = !n || n.email_enabled;
      form.email.disabled = !mail && !form.email.value;
      $('#notify-email-hint').hidden = mail;
      $('#notify-secret').hidden = !(n && n.secret);
      $('#notify-secret-value').value = (n && n.secret) || '';
    }

    async function send(path, method, json, done) {
      try {
        const {notifications} = await api(path, {method, json});
        show(notifications);
        say(status, done);
      } catch (err) {
        say(status, err.message, 'error');
      }
    }

    form.addEventListener('submit', e => {
      e.preventDefault();
      const json = {webhook: form.webhook.value.trim() || null, on_running: form.on_running.checked};
      if (!form.email.disabled) json.email = form.email.value.trim() || null;
      send('/me/notifications', 'PUT', json, 'Notifications saved: tasks you submit from now on are notified.');
    });
    $('#notify-clear').addEventListener('click', async () => {
      const ok = await confirmAction({title: 'Clear notifications?', ok: 'Clear',
                                      text: 'Your webhook, e-mail and signing secret are forgotten.'});
      if (ok) send('/me/notifications', 'DELETE', undefined, 'Notifications cleared.');
    });
    $('#notify-rotate').addEventListener('click', async () => {
      const ok = await confirmAction({title: 'Rotate the signing secret?', ok: 'Rotate',
                                      text: 'Deliveries are signed with the new secret from now on: '
                                        + 'update your receivers.'});
      if (ok) send('/me/notifications/secret', 'POST', undefined, 'A new signing secret was made.');
    });
    api('/me/notifications').then(({notifications}) => show(notifications))
      .catch(err => say(status, err.message, 'error'));
  }

  function passwordForm() {
    const status = $('#password-status');
    if (new URLSearchParams(location.search).get('password') === 'changed') say(status, 'Your password was changed.');
    $('#password-form').addEventListener('submit', async e => {
      e.preventDefault();
      const form = e.target;
      if (form.new.value !== form.again.value) {
        say(status, 'The two new passwords differ.', 'error');
        form.again.focus();
        return;
      }
      try {
        await api('/me/password', {method: 'POST', json: {current: form.current.value, new: form.new.value}});
      } catch (err) {
        say(status, err.message, 'error');
        return;
      }
      location.assign('/account?password=changed');  // the session was renewed, with a new CSRF token
    });
  }

  function usersSection() {
    const status = $('#users-status');
    const tbody = $('#users tbody');
    const more = $('#users-more');
    let after = null;

    function secret(title, password) {
      $('#user-secret').hidden = false;
      $('#user-secret-title').textContent = title;
      const value = $('#user-secret-value');
      value.value = password;
      value.focus();
      value.select();
    }

    async function act(user, action) {
      const texts = {
        disable: {title: `Disable ${user.name}?`, ok: 'Disable',
                  text: 'They can no longer log in and none of their tokens works; their tasks keep running.'},
        enable: null,
        'reset-password': {title: `Reset the password of ${user.name}?`, ok: 'Reset password',
                           text: 'Their old password stops working; the new one is shown here once.'},
      };
      if (texts[action] && !await confirmAction(texts[action])) return;
      try {
        const answer = await api(`/users/${encodeURIComponent(user.name)}/${action}`, {method: 'POST'});
        if (answer.password) secret(`New password for ${user.name}`, answer.password);
        say(status, `${user.name}: ${action === 'reset-password' ? 'password reset' : action + 'd'}.`);
      } catch (e) {
        say(status, e.message, 'error');
      }
      load(true);
    }

    function userRow(user) {
      const toggle = h('button', {type: 'button', class: user.disabled ? 'small' : 'small danger-quiet',
                                  'aria-label': `${user.disabled ? 'Enable' : 'Disable'} ${user.name}`},
                       user.disabled ? 'Enable' : 'Disable');
      toggle.addEventListener('click', () => act(user, user.disabled ? 'enable' : 'disable'));
      const reset = h('button', {type: 'button', class: 'small', 'aria-label': `Reset the password of ${user.name}`},
                      'Reset password');
      reset.addEventListener('click', () => act(user, 'reset-password'));
      return h('tr', {'data-user': user.name},
        h('td', {'data-label': 'Name'}, user.name),
        h('td', {'data-label': 'Role'}, user.admin ? 'admin' : 'user'),
        h('td', {'data-label': 'Status'}, user.disabled ? h('span', {class: 'state state-cancelled'}, '⊘ disabled')
                                                         : h('span', {class: 'state state-succeeded'}, '✓ active')),
        h('td', {'data-label': 'Created'}, timeEl(user.created_at)),
        h('td', {'data-label': 'Last used'}, timeEl(user.last_used_at, shortTime, 'never')),
        h('td', {class: 'row-actions'}, toggle, reset));
    }

    async function load(fresh) {
      if (fresh) after = null;
      try {
        const q = new URLSearchParams();
        if (after) q.set('after', after);
        const answer = await api('/users?' + q);
        const made = answer.users.map(userRow);
        if (fresh || !after) tbody.replaceChildren(...made); else tbody.append(...made);
        after = answer.next || null;
        more.hidden = !after;
      } catch (e) {
        say(status, e.message, 'error');
      }
    }
    more.addEventListener('click', () => load(false));

    $('#user-form').addEventListener('submit', async e => {
      e.preventDefault();
      const form = e.target;
      try {
        const answer = await api('/users', {method: 'POST', json: {name: form.name.value.trim(), admin: form.admin.checked}});
        secret(`Password for ${answer.user.name}`, answer.password);
        say(status, `Created ${answer.user.name}.`);
        form.reset();
      } catch (err) {
        say(status, err.message, 'error');
      }
      load(true);
    });
    load(true);
  }

  // ------------------------------------------------------------------ start

  const pages = {tasks: tasksPage, submit: submitPage, task: taskPage, nodes: nodesPage,
                 usage: usagePage, account: accountPage};
  const start = pages[document.body.dataset.page];
  if (start) start();
})();
