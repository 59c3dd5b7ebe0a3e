"""pink-web: the Flask app (`web.app`) and its server (`web.serve`).

Nothing is imported here, and `web.serve` imports the app only inside each
gunicorn worker: the master imports this package before its gevent workers
patch the standard library, and a module imported before that would keep
the OS's locks and blocking sockets, which stall a whole worker.
"""
