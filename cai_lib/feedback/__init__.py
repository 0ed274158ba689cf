"""RLAIF: response pairs, AI preference labels, what the labels measure, ratings.

pairs          two sampled responses per red-team prompt from the policy under study
labels         the multiple-choice feedback prompt, principle ensembles, both orders, CoT, label rows
label_metrics  soft labels: normalise, clamp, debias, swap consistency, accuracy, calibration (pure)
preferences    `preference_dataset`: a projection of the label events (+ human comparison files)
spark_labels   the same pairs, label plan, scoring and preference_dataset on the Spark-native data plane
elo            Elo ratings from soft pairwise preferences (Bradley-Terry)
"""
