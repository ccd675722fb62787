from femeta.cli import main

main()
