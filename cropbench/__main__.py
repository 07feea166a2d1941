from cropbench.cli import main

main()
