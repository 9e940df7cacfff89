# Sourced by the GPU scripts, from the repository root: unpacks what scripts/stage-gpu.sh
# gzipped into .gpu/ (nothing to do after ../shared/gpu/bundle).
for f in .gpu/tests/*.gz .gpu/bench/*.gz; do
  [ -f "$f" ] || continue
  gunzip -f "$f" && chmod +x "${f%.gz}"
done
