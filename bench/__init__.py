"""lorakit's benchmark suite: lorakit against PEFT and against the floor, measured interleaved.

python -m bench                 # both settings, 4 fresh processes a case; writes bench/results.json and BENCHMARKS.md
python -m bench --quick         # tiny sizes, to check that the suite runs
"""
