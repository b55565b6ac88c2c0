"""Test harness pieces that talk to the gateway as real peers over loopback."""
