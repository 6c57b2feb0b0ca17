"""Tools around the daemon, not part of it: the demo (``goqd demo``), the market
benchmark (``goqd sim``), the ledger benchmark (``goqd bench ledger``), the import
benchmark (``python -m goqd.tools.importbench``) and the simulated fleet they share
with the tests.

They import the simulators; ``goqd run`` imports nothing from here.
"""
