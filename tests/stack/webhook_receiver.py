"""A webhook receiver for rollcall's tests that checks every request with
the reference Standard Webhooks implementation (the `standardwebhooks`
package), not rollcall's own code.

    webhook_receiver.py LOG [--fail-first N]

The signing secret comes from ROLLCALL_WEBHOOK_SECRET. It prints the port it
listens on (127.0.0.1), answers 503 to the first N verified requests (a
receiver that is down for a while), then 204, and appends one JSON line per
request to LOG: {"status", "verified", "id", "type", "at", "agent_id"}.
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    webhook = Webhook(os.environ["ROLLCALL_WEBHOOK_SECRET"])
    lock = threading.Lock()
    state = {"failed": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            record = {"id": headers.get("webhook-id")}
            try:
                payload = webhook.verify(body, headers)
                record.update(verified=True, type=payload.get("type"),
                              at=payload["data"]["at"], agent_id=payload["data"]["agent_id"])
            except (WebhookVerificationError, KeyError, ValueError) as error:
                record.update(verified=False, error=str(error))
            with lock:
                if not record["verified"]:
                    status = 400
                elif state["failed"] < args.fail_first:
                    state["failed"] += 1
                    status = 503
                else:
                    status = 204
                record["status"] = status
                with open(args.log, "a") as log:
                    log.write(json.dumps(record) + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
