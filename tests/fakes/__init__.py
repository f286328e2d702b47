"""Loopback fakes of the providers' HTTP APIs: real servers on 127.0.0.1 answering with the shapes
and faults documented in ../shared/reference/. Used by the tests and the benchmarks."""
