from fraisier.cli import main

main()
