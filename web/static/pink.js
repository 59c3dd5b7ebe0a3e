// The pages call the REST API with the session cookie and the CSRF header.
const pink = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const api = (path, opts = {}) => fetch('/api/v1' + path, {
    ...opts, headers: {'X-CSRF-Token': csrf, ...(opts.headers || {})}, credentials: 'same-origin',
  }).then(async r => { const b = r.headers.get('content-type') || '';
    const data = b.includes('json') ? await r.json() : await r.text();
    if (!r.ok) throw new Error(data.message || r.statusText); return data; });
  const cell = t => { const td = document.createElement('td'); td.textContent = t ?? ''; return td; };
  const link = (href, t) => { const td = cell(''); const a = document.createElement('a');
    a.href = href; a.textContent = t; td.appendChild(a); return td; };

  function upload(form) {
    const file = form.image.files[0];
    const q = new URLSearchParams();
    for (const k of ['name', 'cmd', 'gpus', 'timeout', 'output']) if (form[k].value) q.set(k, form[k].value);
    const xhr = new XMLHttpRequest();
    const bar = document.getElementById('progress'), status = document.getElementById('upload-status');
    bar.hidden = false;
    xhr.upload.onprogress = e => { if (e.lengthComputable) bar.value = 100 * e.loaded / e.total; };
    xhr.onload = () => { const d = JSON.parse(xhr.responseText || '{}');
      status.textContent = xhr.status === 201 ? 'submitted ' + d.task.id : (d.message || xhr.statusText);
      refreshTasks(); };
    xhr.onerror = () => { status.textContent = 'upload failed: connection lost'; };
    xhr.open('POST', '/api/v1/tasks?' + q);
    xhr.setRequestHeader('Content-Type', 'application/x-tar');
    xhr.setRequestHeader('X-CSRF-Token', csrf);
    xhr.send(file);
  }

  function refreshTasks() {
    return api('/tasks').then(d => {
      const body = document.querySelector('#tasks tbody'); body.replaceChildren();
      for (const t of d.tasks) {
        const tr = document.createElement('tr');
        const state = cell(t.state); state.className = 'state-' + t.state;
        tr.append(link('/tasks/' + t.id, t.id), cell(t.name), state, cell(t.node), cell(t.attempt),
                  cell(t.exit_code), cell(t.created_at));
        body.appendChild(tr);
      }
    });
  }

  function tasksPage() {
    document.getElementById('upload').addEventListener('submit', e => { e.preventDefault(); upload(e.target); });
    refreshTasks(); setInterval(refreshTasks, 2000);
  }

  async function followLogs(id) {
    const pre = document.getElementById('logs');
    const r = await fetch('/api/v1/tasks/' + id + '/logs?follow=1', {credentials: 'same-origin'});
    const reader = r.body.getReader(); const dec = new TextDecoder();
    for (;;) { const {done, value} = await reader.read(); if (done) break; pre.textContent += dec.decode(value); }
  }

  function taskPage(id) {
    const dl = document.getElementById('task');
    const show = () => api('/tasks/' + id).then(({task}) => {
      dl.replaceChildren();
      for (const k of ['name', 'state', 'node', 'attempt', 'exit_code', 'error', 'waiting', 'created_at']) {
        const dt = document.createElement('dt'); dt.textContent = k;
        const dd = document.createElement('dd'); dd.textContent = task[k] ?? '';
        dl.append(dt, dd);
      }
      const dlink = document.getElementById('download');
      if (task.output) { dlink.href = '/api/v1/tasks/' + id + '/output'; dlink.hidden = false;
        dlink.textContent = 'Download ' + task.output.filename + ' (' + task.output.size + ' bytes)'; }
      const cancel = document.getElementById('cancel');
      cancel.hidden = ['succeeded', 'failed', 'timed_out', 'cancelled'].includes(task.state);
    });
    document.getElementById('cancel').onclick = () => {
      if (confirm('Cancel this task?')) api('/tasks/' + id, {method: 'DELETE'}).then(show); };
    show(); setInterval(show, 2000); followLogs(id);
  }

  function nodesPage() {
    const load = () => api('/nodes').then(d => {
      const body = document.querySelector('#nodes tbody'); body.replaceChildren();
      for (const n of d.nodes) { const tr = document.createElement('tr');
        tr.append(cell(n.name), cell(n.host), cell(n.state), cell(n.gpus.length + ' (' + n.gpu_mode + ')'),
                  cell(n.tasks.join(', ')), cell(n.images)); body.appendChild(tr); }
    });
    load(); setInterval(load, 3000);
  }
  return {tasksPage, taskPage, nodesPage};
})();
