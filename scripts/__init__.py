"""The developers' scripts (dev stack, bench) and the service launchers they share with the tests:
a package so that `scripts.launchers` imports the same way from tests/ and from scripts/. Never
part of the product: not in the wheel, never imported by broker/."""
