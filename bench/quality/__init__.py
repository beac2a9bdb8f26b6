"""Result quality: federated rounds and pruned sweeps against central training (make
bench-quality; bench/quality/__main__.py says what runs). Not part of `make bench`: it
measures losses, not speed, and takes its own half hour."""
