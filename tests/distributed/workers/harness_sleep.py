"""Prints its pid and sleeps, with no watchdog: only the launcher's timeout can end it."""

import os
import time

if __name__ == "__main__":
    print(f"worker pid={os.getpid()}", flush=True)
    time.sleep(3600)
