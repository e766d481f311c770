"""The code a routed CPM folder carries for ``trust_remote_code`` loaders, copied into the folder by
:func:`forgetless.cpm.write_routing`. ``cpm_router`` is the routing rule itself; ``modeling_forgetless_cpm``
imports transformers, so forgetless never imports it."""

from pathlib import Path

REMOTE_DIR = Path(__file__).parent
