# shellcheck shell=bash
setup_bench() { :; }
