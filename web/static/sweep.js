// The sweep page (web/templates/sweep.html): counts by state and a page of
// indexes from GET /api/v1/sweeps/<id>, refreshed every few seconds; cancel
// all (POST .../cancel) or one index (DELETE /api/v1/tasks/<id>). Text only,
// never HTML, as in pink.js.
'use strict';

(() => {
  const $ = sel => document.querySelector(sel);
  const csrf = ($('meta[name="csrf-token"]') || {}).content || '';
  const sweepId = document.body.dataset.sweepId;
  const PAGE = 100;
  let offset = 0;

  async function api(path, method = 'GET') {
    const response = await fetch('/api/v1' + path, {method, credentials: 'same-origin',
      headers: {'X-CSRF-Token': csrf, Accept: 'application/json'}});
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) throw new Error((data && data.message) || `${response.status} ${response.statusText}`);
    return data;
  }

  function el(tag, text, attrs = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }

  function showError(err) {
    const box = $('#sweep-error');
    box.textContent = err ? err.message : '';
    box.hidden = !err;
  }

  function result(index) {
    if (index.failure && index.failure.summary) return index.failure.summary;
    if (index.error) return index.error;
    if (index.exit_code !== null && index.exit_code !== undefined) return `exit code ${index.exit_code}`;
    return index.waiting || '';
  }

  const FINAL = new Set(['succeeded', 'failed', 'timed_out', 'cancelled']);

  function row(index) {
    const tr = el('tr', null, {'data-index': index.index});
    tr.append(el('td', index.index, {'data-label': 'Index'}));
    const env = Object.entries(index.env || {}).filter(([k]) => k !== 'PINK_SWEEP_INDEX')
      .map(([k, v]) => `${k}=${v}`).join(' ');
    tr.append(el('td', env + (index.cmd ? ` · ${index.cmd.join(' ')}` : ''), {'data-label': 'Env'}));
    tr.append(el('td', index.state.replace('_', ' '), {'data-label': 'State', class: `state state-${index.state}`}));
    tr.append(el('td', result(index), {'data-label': 'Result'}));
    const link = el('a', index.task, {href: `/tasks/${encodeURIComponent(index.task)}`});
    const taskCell = el('td', null, {'data-label': 'Task'});
    taskCell.append(link);
    tr.append(taskCell);
    const actions = el('td');
    if (!FINAL.has(index.state) && index.state !== 'exported') {
      const cancel = el('button', 'Cancel', {type: 'button', class: 'danger', 'data-task': index.task});
      cancel.addEventListener('click', () => act(`/tasks/${encodeURIComponent(index.task)}`, 'DELETE'));
      actions.append(cancel);
    }
    tr.append(actions);
    return tr;
  }

  async function load() {
    try {
      const {sweep} = await api(`/sweeps/${encodeURIComponent(sweepId)}?offset=${offset}&limit=${PAGE}`);
      $('#sweep-size').textContent = `${sweep.size} indexes` +
        (sweep.max_parallel ? `, at most ${sweep.max_parallel} at once` : '');
      const counts = $('#sweep-counts');
      counts.replaceChildren();
      for (const [state, n] of Object.entries(sweep.counts)) {
        counts.append(el('dt', state.replace('_', ' ')), el('dd', n, {'data-state': state}));
      }
      $('#sweep-indexes tbody').replaceChildren(...sweep.indexes.map(row));
      $('#sweep-prev').hidden = offset === 0;
      $('#sweep-next').hidden = offset + PAGE >= sweep.size;
      const live = Object.keys(sweep.counts).some(state => !FINAL.has(state));
      $('#sweep-cancel').hidden = !live;
      showError(null);
    } catch (err) {
      showError(err);
    }
  }

  async function act(path, method) {
    try {
      await api(path, method);
    } catch (err) {
      showError(err);
    }
    await load();
  }

  function start() {
    if (!sweepId) return;
    $('#sweep-cancel').addEventListener('click', () => act(`/sweeps/${encodeURIComponent(sweepId)}/cancel`, 'POST'));
    $('#sweep-prev').addEventListener('click', () => { offset = Math.max(0, offset - PAGE); load(); });
    $('#sweep-next').addEventListener('click', () => { offset += PAGE; load(); });
    load();
    setInterval(load, 3000);
  }

  document.addEventListener('DOMContentLoaded', start);
})();
