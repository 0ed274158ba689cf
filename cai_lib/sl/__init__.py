"""SL-CAI: the critique -> revision chain (planned as deterministic steps) and `sl_dataset`.

chain  plan each prompt's chain, the tasks of a wave, and the dataset projection of the events
spark_chain  the same plan, wave inputs and sl_dataset as Spark DataFrames (`--lake-engine spark`)
"""
