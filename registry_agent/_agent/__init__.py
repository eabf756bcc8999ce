"""The registration agent process: config file, runtime, status server, logs."""
