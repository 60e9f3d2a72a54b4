import CubicleInit

InitServer.main()
