"""The images' HEALTHCHECK: GET /health on the port `loraplex serve` listens on in this container.

The port is the entrypoint's: $LORAPLEX_PORT, else the default of $LORAPLEX_PLATFORM (8080 for SageMaker and
Vertex AI), else 8000.
"""

import os
import sys
import urllib.request

from loraplex.serve.managed import listen_address

port = os.environ.get("LORAPLEX_PORT")
_, port = listen_address(os.environ.get("LORAPLEX_PLATFORM") or None, None, int(port) if port else None)
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:
    print(f"http://127.0.0.1:{port}/health: {e}", file=sys.stderr)
    sys.exit(1)
